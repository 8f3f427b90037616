"""The network modes. Each driver builds its own registry (modes may keep state of their own, e.g. the
SR-IOV VF inventory, in the driver's store); routes never branch on the mode, they look it up."""
from plugincore.errors import InvalidRequest
from .base import Mode, ModeContext
from .overlay import OverlayMode
from .sriov import SriovMode
from .static import StaticMode
from .vlan import VlanMode

MODE_CLASSES: tuple[type[Mode], ...] = (StaticMode, VlanMode, SriovMode, OverlayMode)
DEFAULT_MODE = "static"


class ModeRegistry:
    """One instance of every mode, bound to one driver's context (store, locks, overlay registry)."""

    def __init__(self, ctx: ModeContext):
        self._modes: dict[str, Mode] = {cls.name: cls(ctx) for cls in MODE_CLASSES}

    def get(self, name: str | None) -> Mode:
        name = name or DEFAULT_MODE
        try:
            return self._modes[name]
        except KeyError:
            valid = ", ".join(sorted(self._modes))
            raise InvalidRequest(f"unknown mode {name!r} (valid: {valid})") from None

    def __iter__(self):
        return iter(self._modes.values())

"""Registry of network modes: routes never branch on the mode, they look it up here."""
from plugincore.errors import InvalidRequest
from .base import Mode
from .sriov import SriovMode
from .static import StaticMode
from .vlan import VlanMode

MODES: dict[str, Mode] = {mode.name: mode for mode in (StaticMode(), VlanMode(), SriovMode())}
DEFAULT_MODE = "static"


def get_mode(name: str | None) -> Mode:
    name = name or DEFAULT_MODE
    try:
        return MODES[name]
    except KeyError:
        raise InvalidRequest(f"unknown mode {name!r} (valid: {', '.join(sorted(MODES))})") from None


def bind_all(store, locks) -> None:
    """Give every mode the shared state store and locks (once per process, before any request)."""
    for mode in MODES.values():
        mode.bind(store, locks)

"""The interface every network mode implements; the driver picks a mode from the registry."""
from dataclasses import dataclass, field

from plugincore.errors import InvalidRequest

MTU_OPTION = "com.docker.network.driver.mtu"


@dataclass
class ModeContext:
    """What a driver gives its modes: its state store and locks (modes with tables of their own), the
    overlay registry (local or shared through the cluster store) and the cluster configuration."""

    store: object = None
    locks: object = None
    overlays: object = None
    cluster: dict = field(default_factory=dict)


@dataclass
class Validated:
    """A mode's read-only verdict on a CreateNetwork request."""

    options: dict  # normalised options to persist
    parent: str | None = None  # a NIC the network claims exclusively
    kernel: dict = field(default_factory=dict)  # snapshot of what will change, to undo exactly that


class Mode:
    name = ""
    network_options: dict[str, str] = {}  # accepted `-o` keys -> help text
    endpoint_options: dict[str, str] = {}  # accepted `--driver-opt` keys -> help text

    def __init__(self, ctx: ModeContext | None = None):
        self.ctx = ctx or ModeContext()  # empty in tests that only parse and validate

    def validate(self, ipr, network_id: str, generic: dict, ipv4: list, ipv6: list,
                 internal: bool) -> Validated:
        """Check every option and the kernel preconditions without changing anything."""
        raise NotImplementedError

    def ensure_network(self, ipr, net) -> dict:
        """Create or repair the network's kernel objects; return the kernel record to persist."""
        raise NotImplementedError

    def remove_network(self, ipr, net) -> None:
        """Undo ensure_network, also a partial one; succeed when already undone."""
        raise NotImplementedError

    def ensure_endpoint(self, ipr, net, ep) -> tuple[dict, dict]:
        """Create the endpoint's links for Join; return (kernel record, Join reply)."""
        raise NotImplementedError

    def remove_endpoint(self, ipr, net, ep) -> None:
        raise NotImplementedError

    def repair_endpoint(self, ipr, net, ep, existing: dict) -> bool:
        """At start-up: re-attach a joined endpoint's surviving links; False if they are gone.
        ``existing`` maps link names to LinkInfo, read once for all endpoints (1,000s at start-up)."""
        raise NotImplementedError

    def bridges(self, net) -> list[str]:
        """Bridges whose traffic the FORWARD chain must accept."""
        return []

    def owned_links(self, net) -> list[str]:
        """Links with the plugin's name prefixes the network keeps (start-up removes other ones)."""
        return self.bridges(net)

    # Optional hooks; the defaults suit modes that keep nothing beyond networks and endpoints.
    def endpoint_mac(self, net, options: dict, mac: str) -> str | None:
        """At CreateEndpoint: check the endpoint's ``--driver-opt``s; return the MAC it must have when
        Docker gave none (``mac`` is Docker's, maybe ''), or None to let the driver derive one."""
        return None

    def reconcile(self, ipr, state) -> dict:
        """At start-up, after networks and endpoints are repaired: settle the mode's own state."""
        return {}

    def oper_info(self, net, ep) -> dict:
        return {}

    def shaping_device(self, net) -> str | None:
        """The device whose egress carries the network's containers' outbound traffic (where their HTB
        classes go), or None when the mode limits rates itself (apply_egress)."""
        return None

    def apply_egress(self, ipr, net, ep, rate: int) -> None:
        """Modes without a shaping device: enforce an outbound limit of ``rate`` bits/s (0: none)."""
        if rate:
            raise InvalidRequest(f"rate limits are not supported in {self.name} mode")

    def allocate(self, network_id: str, generic: dict, ipv4: list) -> dict:
        """On a swarm manager (AllocateNetwork): cluster-wide resources for a new network; the options
        returned reach CreateNetwork on every node. Modes without any return {}."""
        return {}

    def free(self, network_id: str) -> None:
        """FreeNetwork: give back what allocate() took; unknown: done."""


def check_known_options(given: dict, known: dict[str, str], what: str) -> None:
    unknown = sorted(k for k in given if k not in known and not k.startswith("com.docker."))
    if unknown:
        valid = ", ".join(sorted(known)) or "none"
        raise InvalidRequest(f"unknown {what} option {', '.join(unknown)} (valid: {valid})")


def parse_mtu(value, limit: int | None = None, limit_name: str = "") -> int | None:
    if value in (None, ""):
        return None
    try:
        mtu = int(value)
    except (TypeError, ValueError):
        raise InvalidRequest(f"{MTU_OPTION}: {value!r} is not a number") from None
    if not 68 <= mtu <= 65535:
        raise InvalidRequest(f"{MTU_OPTION}: {mtu} is outside 68..65535")
    if limit is not None and mtu > limit:
        raise InvalidRequest(f"{MTU_OPTION}: {mtu} exceeds {limit_name}'s MTU {limit}")
    return mtu

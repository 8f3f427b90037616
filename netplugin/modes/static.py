"""Static mode: containers bridged straight onto a physical L2 network, no NAT.

The parent NIC is enslaved to a per-network bridge whose MAC is pinned to the parent's; each endpoint
is a veth pair with the host end on that bridge. The gateway is the physical router (the network's
--gateway), so containers are ordinary hosts on the segment.
"""
from plugincore.errors import BackendError
from ..kernel import links, names
from .base import MTU_OPTION, Validated, check_known_options
from ..shaping import RATE_OPTIONS
from .bridged import BridgedMode


class StaticMode(BridgedMode):
    name = "static"
    network_options = {
        "mode": "network mode: static (default)",
        "parent": "the host NIC on the physical network (required); it must carry no IP address",
        MTU_OPTION: "MTU of the bridge and container interfaces (default: the parent's)",
        **RATE_OPTIONS,
    }

    def validate(self, ipr, network_id, generic, ipv4, ipv6, internal) -> Validated:
        check_known_options(generic, self.network_options, "network")
        parent = self.parent_link(ipr, str(generic.get("parent") or ""))
        self.check_free_uplink(ipr, parent)
        mtu = self.mtu(generic, parent.mtu, f"parent {parent.name}")
        return Validated(options={"parent": parent.name, "mtu": mtu, "internal": bool(internal)},
                         parent=parent.name,
                         kernel={"bridge": names.bridge_name(network_id), "uplink": parent.name,
                                 "parent_up": parent.up})

    def _ensure_uplink(self, ipr, net) -> links.LinkInfo:
        parent = links.get_link(ipr, net.kernel["uplink"])
        if parent is None:
            raise BackendError(f"parent {net.kernel['uplink']} has disappeared")
        return parent

    def _remove_uplink(self, ipr, net) -> None:
        if not net.kernel.get("parent_up", True):
            links.set_link(ipr, net.kernel["uplink"], up=False)  # give it back exactly as it was

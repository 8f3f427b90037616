"""What every bridged mode shares: a per-network bridge on an uplink, one veth pair per endpoint.

A mode says how it gets its uplink (static: the parent NIC itself; vlan: an 802.1Q sub-interface of it);
the bridge, its pinned MAC, the endpoints, Join's reply and start-up repair are the same for all.
"""
from plugincore.errors import BackendError, Conflict, InvalidRequest
from ..kernel import links, names
from ..shaping import RATE_OPTIONS
from .base import MTU_OPTION, Mode, parse_mtu

IFF_LOOPBACK = 0x8


class BridgedMode(Mode):
    endpoint_options = dict(RATE_OPTIONS)
    # Subclasses: validate() and how the uplink appears and goes (_ensure_uplink / _remove_uplink).
    def _ensure_uplink(self, ipr, net) -> links.LinkInfo:
        raise NotImplementedError

    def _remove_uplink(self, ipr, net) -> None:
        raise NotImplementedError

    @staticmethod
    def parent_link(ipr, parent_name: str) -> links.LinkInfo:
        """The parent NIC, checked to be a real Ethernet device that exists."""
        if not parent_name:
            raise InvalidRequest("this mode needs -o parent=<nic>: the host NIC on the physical network")
        if not names.valid_ifname(parent_name):
            raise InvalidRequest(f"parent {parent_name!r} is not a valid interface name")
        parent = links.get_link(ipr, parent_name)
        if parent is None:
            raise InvalidRequest(f"parent {parent_name} does not exist on this host")
        if names.is_owned(parent.name) or parent.kind == "bridge":
            raise InvalidRequest(f"parent {parent.name} is a bridge; give the physical NIC instead")
        if parent.kind is None and parent.mac == "00:00:00:00:00:00":
            raise InvalidRequest(f"parent {parent.name} has no Ethernet address (loopback?)")
        return parent

    @staticmethod
    def check_free_uplink(ipr, uplink: links.LinkInfo) -> None:
        """An uplink we enslave must not belong to another bridge or carry the host's addresses."""
        if uplink.master:
            master = links.get_link_by_index(ipr, uplink.master)
            master_name = master.name if master else str(uplink.master)
            if names.is_owned(master_name):
                raise Conflict(f"parent {uplink.name} is already used by another netplugin network "
                               f"(bridge {master_name})")
            raise Conflict(f"parent {uplink.name} is already enslaved to {master_name}")
        addresses = links.global_addresses(ipr, uplink.index)
        if addresses:
            # Enslaving it would silently cut the host's own connectivity on that NIC.
            raise InvalidRequest(f"parent {uplink.name} carries IP addresses ({', '.join(addresses)}); "
                                 "use a NIC without host addresses")

    @staticmethod
    def mtu(generic: dict, limit: int, limit_name: str) -> int:
        return parse_mtu(generic.get(MTU_OPTION), limit, limit_name) or limit

    def ensure_network(self, ipr, net) -> dict:
        uplink = self._ensure_uplink(ipr, net)
        bridge = links.ensure_bridge(ipr, net.kernel["bridge"], mac=uplink.mac, mtu=net.options["mtu"])
        links.set_master(ipr, uplink.name, bridge.index)
        links.set_link(ipr, uplink.name, up=True)
        # Enslaving can make the kernel re-derive the bridge MTU from its ports: pin it again.
        links.set_link(ipr, bridge.name, mtu=net.options["mtu"])
        return net.kernel

    def remove_network(self, ipr, net) -> None:
        bridge = links.get_link(ipr, net.kernel["bridge"])
        uplink = links.get_link(ipr, net.kernel["uplink"])
        if uplink is not None and bridge is not None and uplink.master == bridge.index:
            links.set_master(ipr, uplink.name, None)
        links.remove_link(ipr, net.kernel["bridge"])
        self._remove_uplink(ipr, net)

    def ensure_endpoint(self, ipr, net, ep) -> tuple[dict, dict]:
        bridge = links.get_link(ipr, net.kernel["bridge"])
        if bridge is None:
            raise BackendError(f"bridge {net.kernel['bridge']} of network {net.id[:12]} is missing")
        host, peer = names.host_veth_name(ep.id), names.peer_veth_name(ep.id)
        # Docker does not set the MTU on the moved link, so both ends get it here.
        links.ensure_veth(ipr, host, peer, mtu=net.options["mtu"], peer_mac=ep.mac,
                          master_index=bridge.index)
        return {"host_if": host, "peer_if": peer}, self._join_reply(net, peer)

    @staticmethod
    def _join_reply(net, peer: str) -> dict:
        reply = {"InterfaceName": {"SrcName": peer, "DstPrefix": "eth"}}
        internal = net.options.get("internal", False)
        if net.gateway and not internal:
            reply["Gateway"] = net.gateway
        if net.gateway6 and not internal:
            reply["GatewayIPv6"] = net.gateway6
        if "Gateway" not in reply:
            # No default route: keep Docker from adding a NAT'ed docker_gwbridge interface.
            reply["DisableGatewayService"] = True
        return reply

    def remove_endpoint(self, ipr, net, ep) -> None:
        for name in (names.host_veth_name(ep.id), names.peer_veth_name(ep.id)):
            links.remove_link(ipr, name)  # the peer is still here if Docker never moved it

    def repair_endpoint(self, ipr, net, ep, existing: dict) -> bool:
        host = existing.get(names.host_veth_name(ep.id))
        bridge = existing.get(net.kernel["bridge"])
        if host is None or bridge is None:
            return False
        if host.master != bridge.index or not host.up:
            ipr.link("set", index=host.index, master=bridge.index, state="up")
        return True

    def bridges(self, net) -> list[str]:
        return [net.kernel["bridge"]]

    def shaping_device(self, net) -> str | None:
        return net.kernel["uplink"]  # where the bridge sends the containers' traffic out

    def oper_info(self, net, ep) -> dict:
        return {"mode": self.name, "parent": net.options.get("parent"), "uplink": net.kernel["uplink"],
                "bridge": net.kernel["bridge"], "host_interface": ep.kernel.get("host_if", ""), "mac": ep.mac}

"""Static mode: containers bridged straight onto a physical L2 network, no NAT.

The parent NIC is enslaved to a per-network bridge whose MAC is pinned to the parent's; each endpoint
is a veth pair with the host end on that bridge. The gateway is the physical router (the network's
--gateway), so containers are ordinary hosts on the segment.
"""
import logging

from plugincore.errors import BackendError, Conflict, InvalidRequest
from ..kernel import links, names
from .base import MTU_OPTION, Mode, Validated, check_known_options, parse_mtu

log = logging.getLogger("netplugin.static")
IFF_LOOPBACK = 0x8


class StaticMode(Mode):
    name = "static"
    network_options = {
        "mode": "network mode: static (default)",
        "parent": "the host NIC on the physical network (required); it must carry no IP address",
        MTU_OPTION: "MTU of the bridge and container interfaces (default: the parent's)",
    }

    def validate(self, ipr, network_id, generic, ipv4, ipv6, internal) -> Validated:
        check_known_options(generic, self.network_options, "network")
        parent_name = str(generic.get("parent") or "")
        if not parent_name:
            raise InvalidRequest("static mode needs -o parent=<nic>: the host NIC on the physical network")
        if not names.valid_ifname(parent_name):
            raise InvalidRequest(f"parent {parent_name!r} is not a valid interface name")
        parent = links.get_link(ipr, parent_name)
        if parent is None:
            raise InvalidRequest(f"parent {parent_name} does not exist on this host")
        self._check_parent_free(ipr, parent)
        mtu = parse_mtu(generic.get(MTU_OPTION), parent.mtu, f"parent {parent_name}") or parent.mtu
        return Validated(options={"parent": parent_name, "mtu": mtu, "internal": bool(internal)}, parent=parent_name,
                         kernel={"bridge": names.bridge_name(network_id), "parent_up": parent.up})

    @staticmethod
    def _check_parent_free(ipr, parent: links.LinkInfo) -> None:
        if names.is_owned(parent.name) or parent.kind == "bridge":
            raise InvalidRequest(f"parent {parent.name} is a bridge; give the physical NIC instead")
        if parent.kind is None and parent.mac == "00:00:00:00:00:00":
            raise InvalidRequest(f"parent {parent.name} has no Ethernet address (loopback?)")
        if parent.master:
            master = links.get_link_by_index(ipr, parent.master)
            master_name = master.name if master else str(parent.master)
            if names.is_owned(master_name):
                raise Conflict(f"parent {parent.name} is already used by another netplugin network "
                               f"(bridge {master_name})")
            raise Conflict(f"parent {parent.name} is already enslaved to {master_name}")
        addresses = links.global_addresses(ipr, parent.index)
        if addresses:
            # Enslaving it would silently cut the host's own connectivity on that NIC.
            raise InvalidRequest(f"parent {parent.name} carries IP addresses ({', '.join(addresses)}); "
                                 "use a NIC without host addresses")

    def ensure_network(self, ipr, net) -> dict:
        parent = links.get_link(ipr, net.parent)
        if parent is None:
            raise BackendError(f"parent {net.parent} has disappeared")
        bridge = links.ensure_bridge(ipr, net.kernel["bridge"], mac=parent.mac, mtu=net.options["mtu"])
        links.set_master(ipr, parent.name, bridge.index)
        links.set_link(ipr, parent.name, up=True)
        # Enslaving can make the kernel re-derive the bridge MTU from its ports: pin it again.
        links.set_link(ipr, bridge.name, mtu=net.options["mtu"])
        return net.kernel

    def remove_network(self, ipr, net) -> None:
        bridge = links.get_link(ipr, net.kernel["bridge"])
        parent = links.get_link(ipr, net.parent) if net.parent else None
        if parent is not None and bridge is not None and parent.master == bridge.index:
            links.set_master(ipr, parent.name, None)
        if parent is not None and not net.kernel.get("parent_up", True):
            links.set_link(ipr, parent.name, up=False)  # give it back exactly as it was
        links.remove_link(ipr, net.kernel["bridge"])

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

    def oper_info(self, net, ep) -> dict:
        return {"mode": self.name, "parent": net.parent, "bridge": net.kernel["bridge"],
                "host_interface": ep.kernel.get("host_if", ""), "mac": ep.mac}

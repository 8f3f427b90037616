"""VLAN mode: an 802.1Q tenant network on a trunk port.

The network's uplink is the sub-interface `<parent>.<vlan>` (created if absent, and then removed with the
network; an existing one is only borrowed and given back as it was), bridged like static mode. Frames
leave the host tagged with the network's VLAN, so tenants on different VLANs share no L2 segment, and the
host routes nothing between them (its bridges carry no addresses).
"""
import errno

from pyroute2 import NetlinkError

from plugincore.errors import BackendError, Conflict, InvalidRequest
from ..kernel import links, names
from .base import MTU_OPTION, Validated, check_known_options
from ..shaping import RATE_OPTIONS
from .bridged import BridgedMode

VLAN_MIN, VLAN_MAX = 1, 4094


def parse_vlan(value) -> int:
    text = str(value or "")
    if not text.isdigit() or not VLAN_MIN <= int(text) <= VLAN_MAX:
        raise InvalidRequest(f"vlan {value!r} is not a VLAN id ({VLAN_MIN}-{VLAN_MAX})")
    return int(text)


def subinterface_name(parent: str, vlan: int, network_id: str) -> str:
    name = f"{parent}.{vlan}"
    # Interface names stop at 15 characters: a long parent gets a name derived from the network.
    return name if len(name) <= 15 else f"npq-{network_id[:6]}.{vlan}"


class VlanMode(BridgedMode):
    name = "vlan"
    network_options = {
        "mode": "vlan",
        "parent": "the host NIC carrying the VLAN trunk (required)",
        "vlan": "802.1Q VLAN id, 1-4094 (required)",
        MTU_OPTION: "MTU of the bridge and container interfaces (default: the parent's)",
        **RATE_OPTIONS,
    }

    def validate(self, ipr, network_id, generic, ipv4, ipv6, internal) -> Validated:
        check_known_options(generic, self.network_options, "network")
        parent = self.parent_link(ipr, str(generic.get("parent") or ""))
        if "vlan" not in generic:
            raise InvalidRequest("vlan mode needs -o vlan=<1-4094>")
        vlan = parse_vlan(generic["vlan"])
        uplink_name = subinterface_name(parent.name, vlan, network_id)
        existing = links.get_link(ipr, uplink_name)
        if existing is not None:
            self._check_is_vlan_of(ipr, existing, parent, vlan)
            self.check_free_uplink(ipr, existing)
        mtu = self.mtu(generic, parent.mtu, f"parent {parent.name}")
        return Validated(
            options={"parent": parent.name, "vlan": vlan, "mtu": mtu, "internal": bool(internal)},
            parent=uplink_name,  # the claim: one network per parent + VLAN
            kernel={"bridge": names.bridge_name(network_id), "uplink": uplink_name,
                    "created_uplink": existing is None,
                    "uplink_up": existing.up if existing else False})

    @staticmethod
    def _check_is_vlan_of(ipr, link: links.LinkInfo, parent: links.LinkInfo, vlan: int) -> None:
        msg = ipr.link("get", index=link.index)[0]
        kind_ok = link.kind == "vlan"
        vid = msg.get_nested("IFLA_LINKINFO", "IFLA_INFO_DATA", "IFLA_VLAN_ID") if kind_ok else None
        if not kind_ok or msg.get("link") != parent.index or vid != vlan:
            raise Conflict(f"{link.name} exists but is not VLAN {vlan} of {parent.name}")

    def _ensure_uplink(self, ipr, net) -> links.LinkInfo:
        name, parent_name = net.kernel["uplink"], net.options["parent"]
        parent = links.get_link(ipr, parent_name)
        if parent is None:
            raise BackendError(f"parent {parent_name} has disappeared")
        links.set_link(ipr, parent_name, up=True)  # a VLAN carries nothing over a parent that is down
        if links.get_link(ipr, name) is None:
            if not net.kernel.get("created_uplink"):
                raise BackendError(f"VLAN interface {name} has disappeared")
            try:
                ipr.link("add", ifname=name, kind="vlan", link=parent.index, vlan_id=net.options["vlan"])
            except NetlinkError as exc:
                if exc.code == errno.EOPNOTSUPP:
                    raise BackendError("this kernel has no 802.1Q support (module 8021q)") from None
                if exc.code != errno.EEXIST:
                    raise
        return links.get_link(ipr, name)

    def _remove_uplink(self, ipr, net) -> None:
        if net.kernel.get("created_uplink"):
            links.remove_link(ipr, net.kernel["uplink"])
        else:
            links.set_link(ipr, net.kernel["uplink"], up=net.kernel.get("uplink_up", True))
        # The trunk parent stays up: other VLAN networks may ride on it.

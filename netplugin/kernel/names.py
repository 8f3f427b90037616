"""Kernel object names derived from Docker IDs, so any later call (or a restart) finds them again.

Linux interface names are at most 15 characters: a 4-character prefix plus 11 characters of the ID.
"""
import ipaddress
import os
import re

BRIDGE_PREFIX = "npb-"  # a network's bridge
HOST_VETH_PREFIX = "npe-"  # an endpoint's host-side veth end
PEER_VETH_PREFIX = "npc-"  # its container-side end until Docker moves and renames it
VXLAN_PREFIX = "npx-"  # a network's VXLAN device (overlay mode)
OWNED_PREFIXES = (BRIDGE_PREFIX, HOST_VETH_PREFIX, PEER_VETH_PREFIX, VXLAN_PREFIX)
IFNAME = re.compile(r"^[A-Za-z0-9_.@:-]{1,15}$")
_ID_CHARS = 11


def bridge_name(network_id: str) -> str:
    return BRIDGE_PREFIX + network_id[:_ID_CHARS]


def host_veth_name(endpoint_id: str) -> str:
    return HOST_VETH_PREFIX + endpoint_id[:_ID_CHARS]


def peer_veth_name(endpoint_id: str) -> str:
    return PEER_VETH_PREFIX + endpoint_id[:_ID_CHARS]


def vxlan_name(network_id: str) -> str:
    return VXLAN_PREFIX + network_id[:_ID_CHARS]


def is_owned(ifname: str) -> bool:
    return ifname.startswith(OWNED_PREFIXES)


def valid_ifname(name: str) -> bool:
    return bool(IFNAME.match(name)) and name not in (".", "..")


def mac_for(address: str) -> str:
    """A stable, locally administered unicast MAC: 02:4e + the IPv4 address (unique on one L2 segment
    because the address is; a replaced container keeps its MAC, so neighbours' ARP caches stay right).
    Without IPv4, a random locally administered MAC."""
    if address:
        ip = ipaddress.ip_interface(address).ip
        if ip.version == 4:
            return "02:4e:" + ":".join(f"{b:02x}" for b in ip.packed)
    raw = bytearray(os.urandom(6))
    raw[0] = (raw[0] & 0xFC) | 0x02
    return ":".join(f"{b:02x}" for b in raw)

"""Idempotent link operations over netlink (pyroute2). No Docker terms here.

``ensure_*`` creates or repairs, ``remove_*`` succeeds when the object is already gone.
"""
import errno
import socket
from dataclasses import dataclass

from pyroute2 import NetlinkError

from plugincore.errors import BackendError, Conflict

IFF_UP = 0x1
IFNAMSIZ = 15


@dataclass(frozen=True)
class LinkInfo:
    index: int
    name: str
    kind: str | None  # None for plain devices (real NICs have no IFLA_INFO_KIND)
    master: int | None
    mtu: int
    mac: str
    up: bool


def _info(msg) -> LinkInfo:
    return LinkInfo(index=msg["index"], name=msg.get("ifname"), kind=msg.get(("linkinfo", "kind")),
                    master=msg.get("master") or None, mtu=msg.get("mtu"), mac=msg.get("address"),
                    up=bool(msg["flags"] & IFF_UP))


def get_link(ipr, name: str) -> LinkInfo | None:
    try:
        return _info(ipr.link("get", ifname=name)[0])
    except NetlinkError as exc:
        if exc.code == errno.ENODEV:
            return None
        raise


def get_link_by_index(ipr, index: int) -> LinkInfo | None:
    try:
        return _info(ipr.link("get", index=index)[0])
    except NetlinkError as exc:
        if exc.code == errno.ENODEV:
            return None
        raise


def list_links(ipr) -> list[LinkInfo]:
    return [_info(msg) for msg in ipr.get_links()]


def global_addresses(ipr, index: int) -> list[str]:
    """Addresses that make a link part of the host's IP configuration (link-local ones do not)."""
    found = []
    for msg in ipr.get_addr(index=index):
        if msg["scope"] == 0:  # RT_SCOPE_UNIVERSE
            family = "inet6" if msg["family"] == socket.AF_INET6 else "inet"
            found.append(f"{msg.get('IFA_ADDRESS')}/{msg['prefixlen']} ({family})")
    return found


def ensure_bridge(ipr, name: str, mac: str, mtu: int) -> LinkInfo:
    """A bridge ``name`` that is up with a pinned MAC (a bridge whose MAC follows its ports flaps and cuts
    the host off, docker-net-dhcp#27) and the given MTU."""
    link = get_link(ipr, name)
    if link is None:
        try:
            ipr.link("add", ifname=name, kind="bridge")
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise
        link = get_link(ipr, name)
    if link is None or link.kind != "bridge":
        raise Conflict(f"link {name} exists and is not a bridge")
    ipr.link("set", index=link.index, address=mac, mtu=mtu, state="up")
    return get_link_by_index(ipr, link.index)


def set_master(ipr, name: str, master_index: int | None) -> None:
    link = get_link(ipr, name)
    if link is None:
        raise BackendError(f"link {name} does not exist")
    if link.master != master_index:
        ipr.link("set", index=link.index, master=master_index or 0)


def set_link(ipr, name: str, *, up: bool | None = None, mtu: int | None = None) -> None:
    link = get_link(ipr, name)
    if link is None:
        return
    changes = {}
    if mtu is not None and link.mtu != mtu:
        changes["mtu"] = mtu
    if up is not None and link.up != up:
        changes["state"] = "up" if up else "down"
    if changes:
        ipr.link("set", index=link.index, **changes)


def ensure_veth(ipr, host_name: str, peer_name: str, *, mtu: int, peer_mac: str,
                master_index: int) -> LinkInfo:
    """A fresh veth pair: host end up on ``master_index``, peer down (Docker moves and configures it).

    A leftover pair of the same name is replaced: Docker expects to move a pristine peer."""
    remove_link(ipr, host_name)
    remove_link(ipr, peer_name)
    ipr.link("add", ifname=host_name, kind="veth", mtu=mtu,
             peer={"ifname": peer_name, "address": peer_mac, "mtu": mtu})
    host = get_link(ipr, host_name)
    ipr.link("set", index=host.index, master=master_index, state="up")
    return host


def remove_link(ipr, name: str) -> bool:
    """Delete ``name``; True if something was deleted, False if it was already gone."""
    try:
        ipr.link("del", ifname=name)
        return True
    except NetlinkError as exc:
        if exc.code in (errno.ENODEV, errno.ENOENT):
            return False
        raise

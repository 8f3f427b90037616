"""VXLAN devices and their forwarding database (FDB), over netlink (pyroute2). No Docker terms here.

The control plane (etcd, written by another module) knows every remote endpoint's MAC and the VTEP
(underlay IPv4 address) of the host it lives on. So the data plane needs neither of the two ways VXLAN
usually finds out:

* no multicast group: underlays (clouds, routed fabrics) rarely carry multicast, so broadcast and
  unknown-unicast frames (ARP requests first of all) go by head-end replication instead: one all-zero
  MAC (00:00:00:00:00:00) FDB entry per remote VTEP, and the kernel sends a copy to each;
* no learning (``nolearning``): learned entries would come from whatever frames happen to arrive,
  age out, and race the entries written here. Every unicast entry is static (NUD_PERMANENT, on the
  device itself, NTF_SELF) with the VTEP as its destination (NDA_DST).

The entries this module manages are exactly those with a destination; entries without one (the
bridge's own ``master`` entries for the port, for instance) belong to the kernel and are never
touched. ``sync_fdb`` makes the managed set equal to the wanted one with one dump plus only the
changes, so a resync over thousands of endpoints costs little when little changed; the
``add_*``/``remove_*`` functions are the incremental path. Every function is idempotent.
"""
import errno
import ipaddress

from pyroute2 import NetlinkError
from pyroute2.netlink.rtnl.ndmsg import NTF_SELF, NUD_NOARP, NUD_PERMANENT

from plugincore.errors import BackendError
from . import links

VXLAN_PORT = 4789  # IANA
OVERHEAD = 50  # outer IPv4 20 + UDP 8 + VXLAN 8 + inner Ethernet 14
ZERO_MAC = "00:00:00:00:00:00"  # the head-end replication ("flood") entries' MAC
_STATIC = NUD_PERMANENT | NUD_NOARP  # what the kernel reports for a static FDB entry


def _data(ipr, name: str) -> dict | None:
    """The IFLA_INFO_DATA of vxlan link ``name``, None if there is no vxlan link of that name."""
    try:
        msg = ipr.link("get", ifname=name)[0]
    except NetlinkError as exc:
        if exc.code == errno.ENODEV:
            return None
        raise BackendError(f"vxlan {name}: cannot read link: {exc}") from exc
    if msg.get(("linkinfo", "kind")) != "vxlan":
        return None
    data = msg.get(("linkinfo", "data"))
    return {
        "vni": data.get("IFLA_VXLAN_ID"),
        "local": data.get("IFLA_VXLAN_LOCAL"),
        "port": data.get("IFLA_VXLAN_PORT"),
        "dev_index": data.get("IFLA_VXLAN_LINK") or None,
        "learning": bool(data.get("IFLA_VXLAN_LEARNING")),
        "group": data.get("IFLA_VXLAN_GROUP"),
    }


def vxlan_info(ipr, name: str) -> dict | None:
    """{"vni", "local", "port", "dev_index", "learning"} as the kernel reports them; None when there is
    no vxlan link ``name``."""
    data = _data(ipr, name)
    if data is None:
        return None
    del data["group"]
    return data


def ensure_vxlan(ipr, name: str, *, vni: int, local: str, dev: str | None, mtu: int,
                 master_index: int | None = None, port: int = VXLAN_PORT) -> links.LinkInfo:
    """A vxlan link ``name`` (VNI ``vni``, VTEP address ``local``, underlay ``dev``, UDP ``port``,
    no learning, no multicast group) that is up with ``mtu`` and, if given, on ``master_index``
    (None leaves its master alone).

    An existing link whose identity differs is an error, never reused: the VNI, VTEP and port are
    what the remote hosts' FDBs point at, and an old device carrying another network's VNI would
    silently join the wrong overlay."""
    local = _vtep(name, local)
    dev_index = None
    if dev is not None:
        lower = links.get_link(ipr, dev)
        if lower is None:
            raise BackendError(f"vxlan {name}: underlay device {dev} does not exist")
        dev_index = lower.index
    link = links.get_link(ipr, name)
    if link is None:
        extra = {"vxlan_link": dev_index} if dev_index is not None else {}
        try:
            ipr.link("add", ifname=name, kind="vxlan", vxlan_id=vni, vxlan_local=local,
                     vxlan_port=port, vxlan_learning=0, mtu=mtu, **extra)
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise BackendError(f"vxlan {name}: cannot create (vni {vni}, local {local}, "
                                   f"dev {dev}, port {port}, mtu {mtu}): {exc}") from exc
        link = links.get_link(ipr, name)
        if link is None:
            raise BackendError(f"vxlan {name}: vanished right after creation")
    if link.kind != "vxlan":
        raise BackendError(f"link {name} exists and is not a vxlan device (kind {link.kind})")
    have = _data(ipr, name)
    if have is None:
        raise BackendError(f"vxlan {name}: vanished while being checked")
    want = {"vni": vni, "local": local, "port": port, "dev_index": dev_index, "learning": False,
            "group": None}
    diffs = [f"{key} {have[key]} (want {want[key]})" for key in want if have[key] != want[key]]
    if diffs:
        raise BackendError(f"vxlan {name} exists with different settings: {', '.join(diffs)}")
    changes = {}
    if link.mtu != mtu:
        changes["mtu"] = mtu
    if master_index is not None and link.master != master_index:
        changes["master"] = master_index
    if not link.up:
        changes["state"] = "up"
    if changes:
        try:
            ipr.link("set", index=link.index, **changes)
        except NetlinkError as exc:
            raise BackendError(f"vxlan {name}: cannot set {changes}: {exc}") from exc
    return links.get_link_by_index(ipr, link.index)


def remove_vxlan(ipr, name: str) -> bool:
    """Delete vxlan link ``name``; True if something was deleted, False if it was already gone.

    A link of that name that is not a vxlan device is somebody else's: refused, not deleted."""
    link = links.get_link(ipr, name)
    if link is None:
        return False
    if link.kind != "vxlan":
        raise BackendError(f"link {name} is not a vxlan device (kind {link.kind}): not removing it")
    try:
        return links.remove_link(ipr, name)
    except NetlinkError as exc:
        raise BackendError(f"vxlan {name}: cannot remove: {exc}") from exc


def _mac(name: str, mac: str) -> str:
    parts = mac.lower().split(":")
    if len(parts) != 6 or not all(len(p) == 2 and all(c in "0123456789abcdef" for c in p) for p in parts):
        raise BackendError(f"vxlan {name}: invalid MAC address {mac!r}")
    return ":".join(parts)


def _unicast_mac(name: str, mac: str) -> str:
    mac = _mac(name, mac)
    if mac == ZERO_MAC:
        raise BackendError(f"vxlan {name}: {ZERO_MAC} is the flood entry, not a remote endpoint")
    return mac


def _vtep(name: str, vtep: str) -> str:
    try:
        return str(ipaddress.IPv4Address(vtep))
    except ValueError as exc:
        raise BackendError(f"vxlan {name}: invalid VTEP address {vtep!r}") from exc


def _index(ipr, name: str) -> int:
    link = links.get_link(ipr, name)
    if link is None or link.kind != "vxlan":
        raise BackendError(f"vxlan {name} does not exist" if link is None
                           else f"link {name} is not a vxlan device (kind {link.kind})")
    return link.index


def _dump(ipr, name: str, index: int) -> tuple[dict[str, tuple[str, bool]], set[str]]:
    """The managed entries of device ``index``: {mac: (vtep, static)} and the flood VTEPs.

    One AF_BRIDGE dump of the namespace, filtered here: pyroute2 sockets are not strict-checking by
    default, and without strict checking the kernel ignores an ndmsg ifindex filter."""
    unicast, flood = {}, set()
    try:
        for msg in ipr.fdb("dump"):
            if msg["ifindex"] != index or not msg["flags"] & NTF_SELF:
                continue
            dst = msg.get("NDA_DST")
            if not dst:
                continue
            mac = msg.get("NDA_LLADDR").lower()
            if mac == ZERO_MAC:
                flood.add(dst)
            else:
                unicast[mac] = (dst, msg["state"] & _STATIC == _STATIC)
    except NetlinkError as exc:
        raise BackendError(f"vxlan {name}: cannot dump the FDB: {exc}") from exc
    return unicast, flood


def _fdb(ipr, name: str, command: str, index: int, mac: str, vtep: str | None) -> None:
    """One FDB request; deleting an entry that is already gone is success."""
    kwargs = {"ifindex": index, "lladdr": mac}
    if vtep is not None:
        kwargs["dst"] = vtep
    if command == "replace":  # pyroute2 fills state and flags in only for add/append/del
        kwargs.update(state=_STATIC, flags=NTF_SELF)
    try:
        ipr.fdb(command, **kwargs)
    except NetlinkError as exc:
        if command == "del" and exc.code == errno.ENOENT:
            return
        raise BackendError(f"vxlan {name}: fdb {command} {mac} dst {vtep}: {exc}") from exc


def fdb_entries(ipr, name: str) -> dict:
    """{"unicast": {mac: vtep}, "flood": {vtep, ...}}: the entries of ``name`` that have a destination."""
    unicast, flood = _dump(ipr, name, _index(ipr, name))
    return {"unicast": {mac: vtep for mac, (vtep, _) in unicast.items()}, "flood": flood}


def sync_fdb(ipr, name: str, *, unicast: dict[str, str], flood: set[str]) -> dict:
    """Make the managed FDB of ``name`` exactly ``unicast`` ({mac: vtep}) plus ``flood`` (VTEPs).

    One dump, then only the differences: new and moved MACs are written with an atomic replace
    (no window without an entry), flood VTEPs are appended before stale ones are deleted, so a
    resync never interrupts traffic that stays. Counts are in (mac, vtep) pairs: a MAC that moved
    to another VTEP is one removed and one added. A matching entry that is not static (a learned
    one) is rewritten as static without being counted."""
    index = _index(ipr, name)
    want_uni = {_unicast_mac(name, mac): _vtep(name, vtep) for mac, vtep in unicast.items()}
    want_flood = {_vtep(name, vtep) for vtep in flood}
    have_uni, have_flood = _dump(ipr, name, index)
    added = removed = 0
    for mac, vtep in want_uni.items():
        current = have_uni.get(mac)
        if current == (vtep, True):
            continue
        _fdb(ipr, name, "replace", index, mac, vtep)
        if current is None or current[0] != vtep:
            added += 1
            removed += current is not None
    for vtep in want_flood - have_flood:
        _fdb(ipr, name, "append", index, ZERO_MAC, vtep)
        added += 1
    for mac in have_uni.keys() - want_uni.keys():
        _fdb(ipr, name, "del", index, mac, have_uni[mac][0])
        removed += 1
    for vtep in have_flood - want_flood:
        _fdb(ipr, name, "del", index, ZERO_MAC, vtep)
        removed += 1
    return {"added": added, "removed": removed}


def add_remote(ipr, name: str, mac: str, vtep: str) -> None:
    """Static entry ``mac`` -> ``vtep`` on ``name``, replacing any other destination of ``mac``."""
    _fdb(ipr, name, "replace", _index(ipr, name), _unicast_mac(name, mac), _vtep(name, vtep))


def remove_remote(ipr, name: str, mac: str, vtep: str | None = None) -> None:
    """Forget ``mac``; with ``vtep``, only if it points there (a MAC that moved meanwhile stays)."""
    _fdb(ipr, name, "del", _index(ipr, name), _unicast_mac(name, mac),
         None if vtep is None else _vtep(name, vtep))


def add_flood(ipr, name: str, vtep: str) -> None:
    """Send a copy of broadcast and unknown-unicast frames to ``vtep``."""
    _fdb(ipr, name, "append", _index(ipr, name), ZERO_MAC, _vtep(name, vtep))


def remove_flood(ipr, name: str, vtep: str) -> None:
    _fdb(ipr, name, "del", _index(ipr, name), ZERO_MAC, _vtep(name, vtep))

"""Leak audits: netplugin's state (its SQLite database, read only) against the kernel of the network
namespace the calling thread is in, and against what the caller ("Docker") still holds. Every finding is
one line; an empty list means state, kernel and caller agree.

Independent of the plugin's own `status` drift check: it reads links, bridge ports, HTB classes, the ipset
and iptables itself, so a bug shared by the plugin's code and its self-check cannot hide here.
"""
from __future__ import annotations

import ipaddress
import json
import sqlite3
import subprocess

from pyroute2 import IPRoute

from netplugin.kernel import names

SHAPE_SET, SHAPE_CHAIN, FORWARD_CHAIN = "netplugin-shape", "NETPLUGIN-SHAPE", "NETPLUGIN-FORWARD"


def read_rows(db_path, sql: str) -> list[dict]:
    """Rows of a plugin's SQLite state, opened read only; [] for a table a fresh plugin has not made yet."""
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10)
    db.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in db.execute(sql)]
    except sqlite3.OperationalError as exc:  # a table a fresh plugin has not made yet
        if "no such table" in str(exc):
            return []
        raise
    finally:
        db.close()


def _cmd(argv: list[str]) -> str:
    return subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout


def _kernel() -> dict:
    with IPRoute() as ipr:
        links = {}
        for link in ipr.get_links():
            info = link.get_attr("IFLA_LINKINFO")
            data = info.get_attr("IFLA_INFO_DATA") if info is not None else None
            vni = data.get_attr("IFLA_VXLAN_ID") if info is not None and info.get_attr("IFLA_INFO_KIND") == "vxlan" \
                and data is not None else None
            links[link.get_attr("IFLA_IFNAME")] = {"index": link["index"], "master": link.get_attr("IFLA_MASTER"),
                                                   "up": bool(link["flags"] & 1), "vni": vni}
        by_index = {v["index"]: k for k, v in links.items()}
        for info in links.values():
            info["master"] = by_index.get(info["master"])
        classes = {}
        for name, info in links.items():
            for msg in ipr.get_classes(index=info["index"]):
                if msg.get_attr("TCA_KIND") == "htb" and msg["handle"] >> 16 == 1 and msg["handle"] & 0xFFFF >= 0x10:
                    classes[(name, msg["handle"] & 0xFFFF)] = True
    entries = {}
    for line in _cmd(["ipset", "save", SHAPE_SET]).splitlines():
        parts = line.split()
        if parts[:1] == ["add"]:
            prio = parts[parts.index("skbprio") + 1] if "skbprio" in parts else "0:0"
            entries[parts[2]] = int(prio.partition(":")[2] or "0", 16)
    mangle = [ln for ln in _cmd(["iptables-save", "-t", "mangle"]).splitlines() if ln.startswith(f"-A {SHAPE_CHAIN}")]
    forward = sorted(ln for ln in _cmd(["iptables-save", "-t", "filter"]).splitlines()
                     if ln.startswith(f"-A {FORWARD_CHAIN}"))
    return {"links": links, "classes": classes, "entries": entries, "mangle": mangle, "forward": forward}


def audit_netplugin(db_path, *, parents: list[str], held_addresses: set[tuple[str, str]] | None = None) -> list[str]:
    """Findings for a netplugin whose state is ``db_path``, serving the current netns. ``parents``: the
    NICs networks may use. ``held_addresses``: {(pool ID, address)} the caller requested and still holds
    without an endpoint (None: do not audit IPAM addresses)."""
    nets = {r["id"]: r | {"kernel": json.loads(r["kernel"])} for r in read_rows(db_path, "SELECT * FROM networks")}
    eps = {r["id"]: r | {"kernel": json.loads(r["kernel"])} for r in read_rows(db_path, "SELECT * FROM endpoints")}
    shaped = read_rows(db_path, "SELECT * FROM shape_classes")
    kernel = _kernel()
    links, found = kernel["links"], []

    bridges = set()
    for net in nets.values():
        if net["status"] != "ready":
            found.append(f"network {net['id'][:12]} left in status {net['status']}")
        bridge, uplink = net["kernel"].get("bridge"), net["kernel"].get("uplink")
        if bridge:
            bridges.add(bridge)
            if bridge not in links:
                found.append(f"network {net['id'][:12]}: bridge {bridge} missing")
            elif uplink and links.get(uplink, {}).get("master") != bridge:
                found.append(f"network {net['id'][:12]}: parent {uplink} not enslaved to {bridge}")
    used_parents = {n["kernel"].get("uplink") for n in nets.values()}
    for parent in parents:
        if parent not in used_parents and parent in links and links[parent]["master"]:
            found.append(f"parent {parent} still enslaved to {links[parent]['master']} with no network on it")

    found += _audit_vnis(db_path, nets, links)
    expected_links = set(bridges) | {n["kernel"].get("uplink") for n in nets.values() if n["mode"] == "overlay"}
    sriov = {i for i, n in nets.items() if n["mode"] == "sriov"}
    found += _audit_vfs(db_path, nets, eps, links) if sriov else []
    for ep in eps.values():
        if ep["network_id"] not in nets:
            found.append(f"endpoint {ep['id'][:12]} of a network that is gone")
        if ep["network_id"] in sriov:  # a VF, no veth: audited by _audit_vfs
            continue
        host, peer = names.host_veth_name(ep["id"]), names.peer_veth_name(ep["id"])
        if ep["sandbox"]:
            expected_links |= {host, peer}  # the peer stays here: no dockerd moves it into a sandbox
            bridge = nets.get(ep["network_id"], {}).get("kernel", {}).get("bridge")
            if host not in links:
                found.append(f"joined endpoint {ep['id'][:12]}: host veth {host} missing")
            elif bridge and links[host]["master"] != bridge:
                found.append(f"joined endpoint {ep['id'][:12]}: {host} not on {bridge}")
    for name in links:
        if names.is_owned(name) and name not in expected_links:
            found.append(f"leaked link {name}")

    wanted_entries, wanted_classes = {}, set()
    for row in shaped:
        ep = eps.get(row["endpoint_id"])
        if ep is None or not ep["sandbox"]:
            found.append(f"traffic class 1:{row['minor']:x} of endpoint {row['endpoint_id'][:12]}, which is not joined")
        wanted_entries[row["address"]] = row["minor"]
        wanted_classes.add((row["device"], row["minor"]))
    if kernel["entries"] != wanted_entries:
        found.append(f"ipset {SHAPE_SET}: {kernel['entries']} in the kernel, {wanted_entries} in the state")
    if set(kernel["classes"]) != wanted_classes:
        found.append(f"HTB classes: {sorted(kernel['classes'])} in the kernel, {sorted(wanted_classes)} in the state")
    if bool(kernel["mangle"]) != bool(wanted_entries):
        found.append(f"mangle chain {SHAPE_CHAIN}: {kernel['mangle']} with {len(wanted_entries)} shaped endpoints")
    wanted_forward = sorted(f"-A {FORWARD_CHAIN} -i {b} -o {b} -j ACCEPT" for b in bridges)
    if kernel["forward"] != wanted_forward:
        found.append(f"{FORWARD_CHAIN}: {kernel['forward']} in the kernel, {wanted_forward} wanted")

    if held_addresses is not None:
        found += _audit_addresses(db_path, nets, eps, held_addresses)
    return found


def _audit_vfs(db_path, nets: dict, eps: dict, links: dict) -> list[str]:
    """SR-IOV: the VF inventory against the endpoints. Every claim an endpoint of that network, every
    endpoint of an SR-IOV network one VF, every pool a live network's, every free VF's netdev at home."""
    found, claims = [], {}
    for vf in read_rows(db_path, "SELECT pf, vf, netdev, network_id, endpoint_id FROM sriov_vfs"):
        where = f"VF {vf['pf']}/{vf['vf']}"
        if vf["network_id"] not in nets:
            found.append(f"{where} still in the pool of network {vf['network_id'][:12]}, which is gone")
        if vf["endpoint_id"]:
            claims[vf["endpoint_id"]] = claims.get(vf["endpoint_id"], 0) + 1
            ep = eps.get(vf["endpoint_id"])
            if ep is None or ep["network_id"] != vf["network_id"]:
                found.append(f"{where} claimed by endpoint {vf['endpoint_id'][:12]}, which is gone")
        elif vf["netdev"] not in links:  # a free VF is back home under its own name
            found.append(f"{where} is free, but its netdev {vf['netdev']} is not here")
    for ep_id, ep in eps.items():
        if nets.get(ep["network_id"], {}).get("mode") == "sriov" and claims.get(ep_id) != 1:
            found.append(f"endpoint {ep_id[:12]} of an SR-IOV network holds {claims.get(ep_id, 0)} VFs")
    return found


def _audit_vnis(db_path, nets: dict, links: dict) -> list[str]:
    """The local overlay registry (no etcd) against the overlay networks and their VXLAN links: every
    VNI allocated has members, every member is a live overlay network with that VNI in its VXLAN link."""
    found, overlays = [], {i: n for i, n in nets.items() if n["mode"] == "overlay"}
    members = {}
    for row in read_rows(db_path, "SELECT vni, name, members FROM overlay_vnis"):
        ids = set(filter(None, row["members"].split(",")))
        if not ids:
            found.append(f"VNI {row['vni']} (overlay {row['name']}) allocated with no member")
        for net_id in ids:
            members[net_id] = row["vni"]
            if net_id not in overlays:
                found.append(f"VNI {row['vni']} (overlay {row['name']}) keeps network {net_id[:12]}, which is gone")
    for net_id, net in overlays.items():
        vni, uplink = net["kernel"].get("vni"), net["kernel"].get("uplink")
        if net["status"] != "ready":
            continue
        if members.get(net_id) != vni:
            found.append(f"overlay network {net_id[:12]} has VNI {vni}, the registry {members.get(net_id)}")
        if links.get(uplink, {}).get("vni") != vni:
            found.append(f"overlay network {net_id[:12]}: VXLAN link {uplink} has VNI "
                         f"{links.get(uplink, {}).get('vni')}, not {vni}")
    return found


def _audit_addresses(db_path, nets: dict, eps: dict, held: set[tuple[str, str]]) -> list[str]:
    """Every allocated address is a gateway of a pool, an endpoint's, or one the caller holds; and every
    endpoint's address is allocated."""
    pools = {r["id"]: ipaddress.ip_network(r["pool"]) for r in read_rows(db_path, "SELECT * FROM ipam_pools")}
    allocated = {}
    for r in read_rows(db_path, "SELECT * FROM ipam_addresses"):  # addr: the address as 32 hex digits
        family = ipaddress.IPv6Address if pools.get(r["pool_id"], ipaddress.ip_network("::/0")).version == 6 \
            else ipaddress.IPv4Address
        allocated[(r["pool_id"], str(family(int(r["addr"], 16))))] = r["kind"]

    def pool_of(address: str) -> str | None:
        ip = ipaddress.ip_address(address)
        return next((pid for pid, net in pools.items() if pid.startswith("local/") and ip in net), None)

    found = []
    accounted = {key for key, kind in allocated.items() if kind == "gateway"} | set(held)
    for ep in eps.values():
        if not ep["address"]:
            continue
        address = str(ipaddress.ip_interface(ep["address"]).ip)
        key = (pool_of(address), address)
        accounted.add(key)
        if key not in allocated:
            found.append(f"endpoint {ep['id'][:12]} uses {address}, which IPAM does not hold")
    for key in sorted(set(allocated) - accounted):
        found.append(f"leaked address {key[1]} in pool {key[0]}")
    for key in sorted(set(held) - set(allocated)):
        found.append(f"address {key[1]} the caller holds is free in pool {key[0]}")
    return found

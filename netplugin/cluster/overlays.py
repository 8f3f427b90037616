"""Overlay networks as the hosts share them: VNIs, members, endpoints and VTEPs.

An overlay is named cluster-wide (``-o overlay=NAME``; by default the Docker network ID, which swarm
makes the same on every node). The first host to attach allocates its VNI; later hosts join it. Each
host publishes the endpoints it runs (MAC, IP, its VTEP) so the others can program their VXLAN
forwarding tables. Two implementations behind one interface:

- ``SharedOverlays`` on etcd (multi-host). Keys under the store prefix:
      overlays/<name>            {"vni", "subnet", "members": {"<host>:<network id>": true}}
      vnis/<vni>                 {"overlay": name}
      endpoints/<name>/<ep id>   {"host", "vtep", "mac", "ip", "network": the host's network id}
      hosts/<host>               {"vtep", "underlay"} on a lease the host's agent keeps alive
- ``LocalOverlays`` in the plugin's SQLite store (one host: VNIs unique on it, nobody to publish to).

Membership is a set of host:network pairs, so attaching twice (start-up repair) or detaching a
network that never attached (rollback) changes nothing.
"""
from __future__ import annotations

import re

from plugincore.errors import Conflict, InvalidRequest
from .etcd import optimistic

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
VNI_MAX = (1 << 24) - 1
SWARM = "swarm"  # the member a swarm manager's AllocateNetwork adds, until FreeNetwork


def check_overlay_name(name: str) -> str:
    if not _NAME.match(name or ""):
        raise InvalidRequest(f"overlay {name!r} is not a valid name (letters, digits, '_', '.', '-'; "
                             "at most 64 characters)")
    return name


class Overlays:
    shared = False

    def attach(self, name: str, network_id: str, vni: int | None, subnet: str, host: str | None = None) -> int:
        """Join (or create) overlay ``name`` for this host's network; returns its VNI. ``host``: a
        member other than this host (``SWARM``: the allocation a swarm manager makes)."""
        raise NotImplementedError

    def detach(self, name: str, network_id: str, host: str | None = None) -> None:
        """Leave it; the overlay, its VNI and endpoints go with the last member. Unknown: done."""
        raise NotImplementedError

    def detach_network(self, network_id: str, host: str) -> None:
        """Leave whichever overlay ``host`` joined for ``network_id`` (FreeNetwork knows only the ID)."""
        raise NotImplementedError

    def publish(self, name: str, endpoint_id: str, mac: str, ip: str, vtep: str, network_id: str) -> None:
        pass

    def withdraw(self, name: str, endpoint_id: str) -> None:
        pass

    def endpoints(self, name: str) -> list[dict]:
        """Every published endpoint of the overlay: {"id", "host", "vtep", "mac", "ip"}."""
        return []


class LocalOverlays(Overlays):
    SCHEMA = ["""CREATE TABLE IF NOT EXISTS overlay_vnis (
        vni INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, subnet TEXT NOT NULL,
        members TEXT NOT NULL DEFAULT '')"""]

    def __init__(self, store, vni_min: int, vni_max: int):
        self.store, self.vni_min, self.vni_max = store, vni_min, vni_max

    def attach(self, name, network_id, vni, subnet, host=None) -> int:
        network_id = f"{host}:{network_id}" if host else network_id
        with self.store.transaction() as db:
            row = db.execute("SELECT vni, subnet, members FROM overlay_vnis WHERE name = ?", (name,)).fetchone()
            if row is not None:
                _check_same(name, row["vni"], row["subnet"], vni, subnet)
                members = set(filter(None, row["members"].split(","))) | {network_id}
                db.execute("UPDATE overlay_vnis SET members = ? WHERE name = ?", (",".join(sorted(members)), name))
                return row["vni"]
            taken = {r["vni"]: r["name"] for r in db.execute("SELECT vni, name FROM overlay_vnis")}
            vni = _pick_vni(vni, taken, self.vni_min, self.vni_max)
            db.execute("INSERT INTO overlay_vnis (vni, name, subnet, members) VALUES (?, ?, ?, ?)",
                       (vni, name, subnet, network_id))
            return vni

    def detach(self, name, network_id, host=None) -> None:
        network_id = f"{host}:{network_id}" if host else network_id
        with self.store.transaction() as db:
            row = db.execute("SELECT members FROM overlay_vnis WHERE name = ?", (name,)).fetchone()
            if row is None:
                return
            members = set(filter(None, row["members"].split(","))) - {network_id}
            if members:
                db.execute("UPDATE overlay_vnis SET members = ? WHERE name = ?", (",".join(sorted(members)), name))
            else:
                db.execute("DELETE FROM overlay_vnis WHERE name = ?", (name,))

    def detach_network(self, network_id, host) -> None:
        member = f"{host}:{network_id}"
        names = [r["name"] for r in self.store.read().execute("SELECT name, members FROM overlay_vnis")
                 if member in r["members"].split(",")]
        for name in names:
            self.detach(name, network_id, host)


class SharedOverlays(Overlays):
    shared = True

    def __init__(self, etcd, host_id: str, vni_min: int, vni_max: int):
        self.etcd, self.host, self.vni_min, self.vni_max = etcd, host_id, vni_min, vni_max

    def attach(self, name, network_id, vni, subnet, host=None) -> int:
        key, member = f"overlays/{name}", f"{host or self.host}:{network_id}"

        def attempt():
            kv = self.etcd.get(key)
            if kv is not None:
                _check_same(name, kv.value["vni"], kv.value["subnet"], vni, subnet)
                if member in kv.value["members"]:
                    return True, kv.value["vni"]
                members = {**kv.value["members"], member: True}
                done = self.etcd.txn([self.etcd.unchanged(kv)], [self.etcd.op_put(key, {**kv.value, "members": members})])
                return done, kv.value["vni"]
            used, _ = self.etcd.range("vnis/", keys_only=True)
            chosen = _pick_vni(vni, {int(u.key.split("/")[1]): "?" for u in used}, self.vni_min, self.vni_max,
                               lookup=lambda n: (self.etcd.get(f"vnis/{n}").value or {}).get("overlay", "?"))
            record = {"vni": chosen, "subnet": subnet, "members": {member: True}}
            done = self.etcd.txn([self.etcd.absent(key), self.etcd.absent(f"vnis/{chosen}")],
                                 [self.etcd.op_put(key, record), self.etcd.op_put(f"vnis/{chosen}", {"overlay": name})])
            return done, chosen

        return optimistic(attempt, f"attaching overlay {name}")

    def detach(self, name, network_id, host=None) -> None:
        key, member = f"overlays/{name}", f"{host or self.host}:{network_id}"

        def attempt():
            kv = self.etcd.get(key)
            if kv is None or member not in kv.value["members"]:
                return True, None
            members = {m: True for m in kv.value["members"] if m != member}
            if members:
                ops = [self.etcd.op_put(key, {**kv.value, "members": members})]
            else:
                ops = [self.etcd.op_delete(key), self.etcd.op_delete(f"vnis/{kv.value['vni']}"),
                       self.etcd.op_delete_prefix(f"endpoints/{name}/")]
            return self.etcd.txn([self.etcd.unchanged(kv)], ops), None

        optimistic(attempt, f"detaching overlay {name}")

    def memberships(self, host: str) -> list[tuple[str, str]]:
        """(overlay name, network id) of every overlay ``host`` is a member of."""
        overlays, _ = self.etcd.range("overlays/")
        return [(kv.key.split("/", 1)[1], member.split(":", 1)[1]) for kv in overlays
                for member in kv.value["members"] if member.split(":", 1)[0] == host]

    def detach_network(self, network_id, host) -> None:
        overlays, _ = self.etcd.range("overlays/")
        for kv in overlays:
            if f"{host}:{network_id}" in kv.value["members"]:
                self.detach(kv.key.split("/", 1)[1], network_id, host)

    def publish(self, name, endpoint_id, mac, ip, vtep, network_id) -> None:
        self.etcd.put(f"endpoints/{name}/{endpoint_id}",
                      {"host": self.host, "vtep": vtep, "mac": mac, "ip": ip, "network": network_id})

    def withdraw(self, name, endpoint_id) -> None:
        self.etcd.delete(f"endpoints/{name}/{endpoint_id}")

    def endpoints(self, name) -> list[dict]:
        found, _ = self.etcd.range(f"endpoints/{name}/")
        return [{"id": kv.key.rsplit("/", 1)[1], **kv.value} for kv in found]

    def all_endpoints(self) -> tuple[dict[str, list[dict]], int]:
        """{overlay name: endpoints} of the whole cluster, and the revision it was read at."""
        found, revision = self.etcd.range("endpoints/")
        by_overlay: dict[str, list[dict]] = {}
        for kv in found:
            _, name, endpoint_id = kv.key.split("/")
            by_overlay.setdefault(name, []).append({"id": endpoint_id, **kv.value})
        return by_overlay, revision

    def watch_endpoints(self, start_revision: int, idle_timeout: float):
        """(overlay name, revision) for each change to an overlay's endpoints (see Etcd.watch)."""
        for _, kv in self.etcd.watch("endpoints/", start_revision, idle_timeout):
            yield kv.key.split("/")[1], kv.mod_revision

    # hosts: liveness for operators and for `netplugin reclaim`
    def register_host(self, info: dict, lease: int) -> None:
        self.etcd.put(f"hosts/{self.host}", info, lease=lease)

    def live_hosts(self) -> dict[str, dict]:
        found, _ = self.etcd.range("hosts/")
        return {kv.key.split("/", 1)[1]: kv.value for kv in found}

    def reclaim(self, host: str) -> dict:
        """Drop a dead host's overlay memberships and published endpoints."""
        summary = {"memberships": 0, "endpoints": 0}
        found, _ = self.etcd.range("endpoints/")
        for kv in found:
            if kv.value.get("host") == host and self.etcd.txn([self.etcd.unchanged(kv)], [self.etcd.op_delete(kv.key)]):
                summary["endpoints"] += 1
        overlays, _ = self.etcd.range("overlays/")
        for kv in overlays:
            gone = [m for m in kv.value["members"] if m.split(":", 1)[0] == host]
            if gone:
                members = {m: True for m in kv.value["members"] if m not in gone}
                name = kv.key.split("/", 1)[1]
                ops = ([self.etcd.op_put(kv.key, {**kv.value, "members": members})] if members else
                       [self.etcd.op_delete(kv.key), self.etcd.op_delete(f"vnis/{kv.value['vni']}"),
                        self.etcd.op_delete_prefix(f"endpoints/{name}/")])
                if self.etcd.txn([self.etcd.unchanged(kv)], ops):
                    summary["memberships"] += len(gone)
        return summary


def _check_same(name: str, vni: int, subnet: str, wanted_vni: int | None, wanted_subnet: str) -> None:
    if wanted_vni is not None and wanted_vni != vni:
        raise Conflict(f"overlay {name} already exists with VNI {vni}, not {wanted_vni}")
    if subnet != wanted_subnet:
        raise Conflict(f"overlay {name} uses subnet {subnet}; this network asks for {wanted_subnet}")


def _pick_vni(wanted: int | None, taken: dict[int, str], lo: int, hi: int, lookup=None) -> int:
    """The requested VNI if free, else the lowest free one of [lo, hi]."""
    if wanted is not None:
        if wanted in taken:
            owner = lookup(wanted) if lookup else taken[wanted]
            raise Conflict(f"VNI {wanted} is already used by overlay {owner}")
        return wanted
    candidate = lo
    for used in sorted(v for v in taken if v >= lo):
        if used > candidate:
            break
        candidate = used + 1
    if candidate > hi:
        raise Conflict(f"no free VNI left in {lo}-{hi} (cluster.vni_min/vni_max)")
    return candidate

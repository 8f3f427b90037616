"""The IPAM driver on the shared cluster store (etcd): pools and addresses unique across hosts.

Same requests, answers and rules as the local (SQLite) driver; what differs is where the truth lives
and how concurrency is settled. Keys (under the store's prefix):

    ipam/spaces/<space>            guard: every pool creation or removal in a space rewrites it
    ipam/pools/<pool key>          {"pool", "sub_pool", "v6", "auto", "options", "refs": {host: n}}
    ipam/addrs/<pool key>/<hex>    {"kind": "gateway"|"address", "refs": {host: n}}

(<pool key> is the PoolID with "/" as "_"; <hex> the 32-digit address, so keys sort numerically.)
Each change is one transaction that compares the revisions it read: two hosts creating overlapping
pools both compare the space's guard, two hosts taking the same address both require the key to be
absent, and the loser re-reads and tries again (a bounded number of times). References are counted
per host, so a dead host's share can be given back (``reclaim``) without touching the others'.
"""
from __future__ import annotations

import logging

from plugincore.errors import Conflict, InvalidRequest, NotFound
from ..cluster.etcd import optimistic
from . import IpamBase
from .cidr import (Network, allocation_range, check_assignable, from_key,
                   lowest_free_block, options_field, parse_address, parse_network, parse_pool,
                   parse_space, text_field, to_key)

log = logging.getLogger("netplugin.ipam.shared")
GATEWAY_REQUEST = "com.docker.network.gateway"


def pool_key(pool_id: str) -> str:
    return pool_id.replace("/", "_")


def _total(refs: dict) -> int:
    return sum(refs.values())


class SharedIpam(IpamBase):
    def __init__(self, etcd, host_id: str, *defaults, **named_defaults):
        super().__init__(*defaults, **named_defaults)
        self.etcd = etcd
        self.host = host_id

    # ---- pools ---------------------------------------------------------------------------

    def request_pool(self, address_space: str, pool: str, sub_pool: str, options: dict | None,
                     v6: bool) -> dict:
        space = parse_space(address_space)
        pool, sub_pool = text_field(pool, "Pool"), text_field(sub_pool, "SubPool")
        opts = options_field(options)
        v6 = bool(v6)
        if sub_pool and not pool:
            raise InvalidRequest(f"ip-range {sub_pool} needs a subnet: pass --subnet as well")
        wanted = parse_pool(pool, sub_pool, v6) if pool else None
        if wanted is None and self.default_blocks[v6] is None:
            raise InvalidRequest("no default IPv6 pool configured; pass --subnet")

        def attempt():
            guard = self.etcd.get(f"ipam/spaces/{space}")
            pools, _ = self.etcd.range("ipam/pools/")
            in_space = [p for p in pools if p.value["space"] == space and p.value["v6"] == v6]
            if wanted is not None:
                net, sub = wanted
                pool_id = f"{space}/{net}" if sub is None else f"{space}/{net}/{sub}"
                same = next((p for p in in_space if p.key == f"ipam/pools/{pool_key(pool_id)}"
                             and not p.value["auto"]), None)
                if same is not None:
                    return self._add_ref(same), (pool_id, net)
                for other in in_space:
                    if parse_network(other.value["pool"], "subnet").overlaps(net):
                        shown = other.value["pool"] + (f" (ip-range {other.value['sub_pool']})"
                                                       if other.value["sub_pool"] else "")
                        raise Conflict(f"{net}{f' (ip-range {sub})' if sub else ''} overlaps pool {shown} "
                                       "already in use in the cluster")
                auto = False
            else:
                supernet, prefix = self.default_blocks[v6]
                taken = [(int(n.network_address), int(n.broadcast_address))
                         for n in (parse_network(p.value["pool"], "subnet") for p in in_space)]
                net, sub = lowest_free_block(supernet, prefix, taken), None
                if net is None:
                    raise Conflict(f"no free /{prefix} left in the default pool {supernet} "
                                   f"(address space {space}); pass --subnet")
                pool_id, auto = f"{space}/{net}", True
            record = {"space": space, "pool": str(net), "sub_pool": str(sub or ""), "v6": v6, "auto": auto,
                      "options": opts, "refs": {self.host: 1}}
            key = f"ipam/pools/{pool_key(pool_id)}"
            done = self.etcd.txn(
                [self.etcd.same_revision(f"ipam/spaces/{space}", guard.mod_revision if guard else 0),
                 self.etcd.absent(key)],
                [self.etcd.op_put(f"ipam/spaces/{space}", {"changed_by": self.host}),
                 self.etcd.op_put(key, record)])
            return done, (pool_id, net)

        pool_id, net = optimistic(attempt, "RequestPool")
        return {"PoolID": pool_id, "Pool": str(net), "Data": {}}

    def _add_ref(self, kv) -> bool:
        refs = dict(kv.value["refs"])
        refs[self.host] = refs.get(self.host, 0) + 1
        return self.etcd.txn([self.etcd.unchanged(kv)], [self.etcd.op_put(kv.key, {**kv.value, "refs": refs})])

    def release_pool(self, pool_id: str) -> None:
        """Drop this host's reference; the pool and its addresses go with the cluster's last one."""
        key = f"ipam/pools/{pool_key(text_field(pool_id, 'PoolID'))}"

        def attempt():
            kv = self.etcd.get(key)
            if kv is None or self.host not in kv.value["refs"]:
                return True, None  # unknown, or this host holds no reference: done
            refs = dict(kv.value["refs"])
            refs[self.host] -= 1
            if refs[self.host] <= 0:
                del refs[self.host]
            if refs:
                return self.etcd.txn([self.etcd.unchanged(kv)],
                                     [self.etcd.op_put(key, {**kv.value, "refs": refs})]), None
            return self._drop_pool(kv), None

        optimistic(attempt, "ReleasePool")

    def _drop_pool(self, kv) -> bool:
        space = kv.value["space"]
        return self.etcd.txn([self.etcd.unchanged(kv)],
                             [self.etcd.op_delete(kv.key),
                              self.etcd.op_delete_prefix(f"ipam/addrs/{kv.key.rsplit('/', 1)[1]}/"),
                              self.etcd.op_put(f"ipam/spaces/{space}", {"changed_by": self.host})])

    # ---- addresses -----------------------------------------------------------------------

    def _pool(self, pool_id: str):
        kv = self.etcd.get(f"ipam/pools/{pool_key(pool_id)}")
        if kv is None:
            raise NotFound(f"pool {pool_id} not found")
        net = parse_network(kv.value["pool"], "subnet")
        sub = parse_network(kv.value["sub_pool"], "ip-range") if kv.value["sub_pool"] else None
        return kv, net, sub

    def request_address(self, pool_id: str, address: str, options: dict | None) -> dict:
        pool_id = text_field(pool_id, "PoolID")
        address = text_field(address, "Address")
        kind = "gateway" if options_field(options).get("RequestAddressType") == GATEWAY_REQUEST else "address"
        wanted = parse_address(address) if address else None

        def attempt():
            pool, net, sub = self._pool(pool_id)
            value = int(wanted) if wanted is not None else self._lowest_free(pool_id, net, sub)
            if wanted is not None:
                check_assignable(wanted, net)
            key = f"ipam/addrs/{pool_key(pool_id)}/{to_key(value)}"
            record = {"kind": kind, "refs": {self.host: 1}}
            if self.etcd.txn([self.etcd.same_incarnation(pool), self.etcd.absent(key)],
                             [self.etcd.op_put(key, record)]):
                return True, type(net.network_address)(value)
            held = self.etcd.get(key)
            if held is None:
                return False, None  # the pool changed or the address came free meanwhile: again
            if wanted is None:
                return False, None  # another host took the lowest one first: pick again
            if kind == "gateway" and held.value["kind"] == "gateway":
                return self._share(held), wanted  # one gateway for several networks on one pool
            raise Conflict(f"address {wanted} is already in use in pool {net}")

        given = optimistic(attempt, "RequestAddress")
        _, net, _ = self._pool(pool_id)
        return {"Address": f"{given}/{net.prefixlen}", "Data": {}}

    def _lowest_free(self, pool_id: str, net: Network, sub: Network | None) -> int:
        """One keys-only read of the pool's addresses; the lowest gap of the allocation range."""
        lo, hi = allocation_range(net, sub)
        used, _ = self.etcd.range(f"ipam/addrs/{pool_key(pool_id)}/", keys_only=True)
        candidate = lo
        for value in sorted(int(kv.key.rsplit("/", 1)[1], 16) for kv in used):
            if value < candidate:
                continue
            if value > candidate:
                break
            candidate += 1
        if candidate > hi:
            where = f"ip-range {sub} of pool {net}" if sub is not None else f"pool {net}"
            raise Conflict(f"no free address in {where}")
        return candidate

    def _share(self, kv) -> bool:
        refs = dict(kv.value["refs"])
        refs[self.host] = refs.get(self.host, 0) + 1
        return self.etcd.txn([self.etcd.unchanged(kv)], [self.etcd.op_put(kv.key, {**kv.value, "refs": refs})])

    def release_address(self, pool_id: str, address: str) -> None:
        """Free an address (a shared gateway only with its last reference). Unknown: done."""
        pool_id, address = text_field(pool_id, "PoolID"), text_field(address, "Address")
        if not address:
            raise InvalidRequest("ReleaseAddress needs an Address")
        freed = parse_address(address)
        key = f"ipam/addrs/{pool_key(pool_id)}/{to_key(int(freed))}"

        def attempt():
            kv = self.etcd.get(key)
            if kv is None:
                return True, None
            refs = dict(kv.value["refs"])
            owner = self.host if self.host in refs else next(iter(refs), None)
            if owner is not None:
                refs[owner] -= 1
                if refs[owner] <= 0:
                    del refs[owner]
            ops = [self.etcd.op_put(key, {**kv.value, "refs": refs})] if refs else [self.etcd.op_delete(key)]
            return self.etcd.txn([self.etcd.unchanged(kv)], ops), None

        optimistic(attempt, "ReleaseAddress")

    # ---- status and recovery ---------------------------------------------------------------

    def pools(self) -> list[dict]:
        pools, _ = self.etcd.range("ipam/pools/")
        addrs, _ = self.etcd.range("ipam/addrs/", keys_only=True)
        in_use: dict[str, int] = {}
        for kv in addrs:
            in_use[kv.key.split("/")[2]] = in_use.get(kv.key.split("/")[2], 0) + 1
        found = []
        for kv in pools:
            v = kv.value
            pool_id = f"{v['space']}/{v['pool']}" + (f"/{v['sub_pool']}" if v["sub_pool"] else "")
            found.append({"id": pool_id, "space": v["space"], "pool": v["pool"], "sub_pool": v["sub_pool"],
                          "v6": v["v6"], "auto": v["auto"], "refs": _total(v["refs"]),
                          "hosts": sorted(v["refs"]), "in_use": in_use.get(kv.key.rsplit("/", 1)[1], 0)})
        return found

    def allocated(self, pool_id: str) -> list[str]:
        kv = self.etcd.get(f"ipam/pools/{pool_key(pool_id)}")
        if kv is None:
            return []
        used, _ = self.etcd.range(f"ipam/addrs/{pool_key(pool_id)}/", keys_only=True)
        return [str(from_key(u.key.rsplit("/", 1)[1], kv.value["v6"])) for u in used]

    def reclaim(self, host: str) -> dict:
        """Give back everything ``host`` held (a host that died for good): its address and pool
        references; addresses and pools nobody else references go."""
        summary = {"addresses": 0, "pools": 0}
        addrs, _ = self.etcd.range("ipam/addrs/")
        for kv in addrs:
            if host in kv.value["refs"]:
                refs = {h: n for h, n in kv.value["refs"].items() if h != host}
                ops = [self.etcd.op_put(kv.key, {**kv.value, "refs": refs})] if refs else [self.etcd.op_delete(kv.key)]
                if self.etcd.txn([self.etcd.unchanged(kv)], ops):
                    summary["addresses"] += 1
        pools, _ = self.etcd.range("ipam/pools/")
        for kv in pools:
            if host in kv.value["refs"]:
                refs = {h: n for h, n in kv.value["refs"].items() if h != host}
                done = (self.etcd.txn([self.etcd.unchanged(kv)], [self.etcd.op_put(kv.key, {**kv.value, "refs": refs})])
                        if refs else self._drop_pool(kv))
                summary["pools"] += int(done and not refs)
        return summary


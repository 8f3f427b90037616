"""Docker remote IPAM driver: address pools and addresses, persisted in the service's Store.

Every mutating call does its read-check-write inside one ``store.transaction()`` (BEGIN
IMMEDIATE): gunicorn workers are separate processes and SQLite's write lock is what keeps two of
them from handing out the same pool or address. Any error rolls the whole call back.
"""
import json
import sqlite3

from plugincore.errors import Conflict, InvalidRequest, NotFound

from . import ranges
from .cidr import (
    Address,
    Network,
    allocation_range,
    check_assignable,
    default_block,
    from_key,
    lowest_free_block,
    options_field,
    parse_address,
    parse_network,
    parse_pool,
    parse_space,
    text_field,
    to_key,
    usable_range,
)

GATEWAY_REQUEST = "com.docker.network.gateway"

IPAM_SCHEMA = [
    # One row per pool. net_start/net_end (hex, see cidr.py) make the overlap check a range query;
    # auto marks pools carved from the default supernet, which are never shared.
    """CREATE TABLE IF NOT EXISTS ipam_pools (
        id        TEXT PRIMARY KEY,
        space     TEXT NOT NULL,
        pool      TEXT NOT NULL,
        sub_pool  TEXT NOT NULL DEFAULT '',
        v6        INTEGER NOT NULL,
        net_start TEXT NOT NULL,
        net_end   TEXT NOT NULL,
        auto      INTEGER NOT NULL DEFAULT 0,
        refs      INTEGER NOT NULL DEFAULT 1,
        options   TEXT NOT NULL DEFAULT '{}'
    )""",
    "CREATE INDEX IF NOT EXISTS ipam_pools_range ON ipam_pools (space, v6, net_start)",
    # Addresses in use. refs > 1 only for a gateway shared by several networks on one pool.
    """CREATE TABLE IF NOT EXISTS ipam_addresses (
        pool_id TEXT NOT NULL,
        addr    TEXT NOT NULL,
        kind    TEXT NOT NULL CHECK (kind IN ('gateway', 'address')),
        refs    INTEGER NOT NULL DEFAULT 1,
        PRIMARY KEY (pool_id, addr)
    ) WITHOUT ROWID""",
    *ranges.SCHEMA,
]


def make_pool_id(space: str, net: Network, sub: Network | None) -> str:
    """Opaque to Docker, readable for people: libnetwork's own "space/pool[/sub-pool]" form."""
    return f"{space}/{net}" if sub is None else f"{space}/{net}/{sub}"


def describe(pool: str, sub_pool: str) -> str:
    return f"{pool} (ip-range {sub_pool})" if sub_pool else pool


class IpamBase:
    """What the local and the shared (etcd) IPAM have in common: defaults and capabilities."""

    def __init__(self, default_supernet: str = "10.200.0.0/16", default_prefix: int = 24,
                 default_supernet_v6: str | None = None, default_prefix_v6: int = 64):
        # Validated now so that a bad configuration stops the service at start, not at a request.
        self.default_blocks = {
            False: default_block(default_supernet, default_prefix, 4),
            True: default_block(default_supernet_v6, default_prefix_v6, 6),
        }

    def capabilities(self) -> dict:
        return {"RequiresMACAddress": False, "RequiresRequestReplay": False}

    def default_address_spaces(self) -> dict:
        return {"LocalDefaultAddressSpace": "local", "GlobalDefaultAddressSpace": "global"}


class Ipam(IpamBase):
    def __init__(self, store, *defaults, **named_defaults):
        super().__init__(*defaults, **named_defaults)
        self.store = store

    # ---- pools ---------------------------------------------------------------------------

    def request_pool(self, address_space: str, pool: str, sub_pool: str, options: dict | None,
                     v6: bool) -> dict:
        space = parse_space(address_space)
        pool = text_field(pool, "Pool")
        sub_pool = text_field(sub_pool, "SubPool")
        options_json = json.dumps(options_field(options), sort_keys=True)
        v6 = bool(v6)
        if pool:
            net, sub = parse_pool(pool, sub_pool, v6)
            with self.store.transaction() as db:
                pool_id = self._share_or_add_pool(db, space, net, sub, options_json)
        elif sub_pool:
            raise InvalidRequest(f"ip-range {sub_pool} needs a subnet: pass --subnet as well")
        else:
            with self.store.transaction() as db:
                pool_id, net = self._carve_default_pool(db, space, v6, options_json)
        return {"PoolID": pool_id, "Pool": str(net), "Data": {}}

    def release_pool(self, pool_id: str) -> None:
        """Drop one reference; the pool and its addresses go with the last one. Unknown: done."""
        pool_id = text_field(pool_id, "PoolID")
        with self.store.transaction() as db:
            row = db.execute("SELECT refs FROM ipam_pools WHERE id = ?", (pool_id,)).fetchone()
            if row is None:
                return
            if row["refs"] > 1:
                db.execute("UPDATE ipam_pools SET refs = refs - 1 WHERE id = ?", (pool_id,))
                return
            db.execute("DELETE FROM ipam_addresses WHERE pool_id = ?", (pool_id,))
            ranges.drop_pool(db, pool_id)
            db.execute("DELETE FROM ipam_pools WHERE id = ?", (pool_id,))

    def _share_or_add_pool(self, db: sqlite3.Connection, space: str, net: Network,
                           sub: Network | None, options_json: str) -> str:
        """Identical requests share one pool (reference counted); anything overlapping conflicts."""
        pool_id = make_pool_id(space, net, sub)
        same = db.execute("SELECT 1 FROM ipam_pools WHERE id = ? AND auto = 0", (pool_id,)).fetchone()
        if same is not None:
            db.execute("UPDATE ipam_pools SET refs = refs + 1 WHERE id = ?", (pool_id,))
            return pool_id
        other = self._overlapping_pool(db, space, net)
        if other is not None:
            raise Conflict(f"{describe(str(net), str(sub or ''))} overlaps pool "
                           f"{describe(other['pool'], other['sub_pool'])} already in use")
        self._add_pool(db, pool_id, space, net, sub, options_json, auto=False)
        return pool_id

    def _carve_default_pool(self, db: sqlite3.Connection, space: str, v6: bool,
                            options_json: str) -> tuple[str, Network]:
        """A new pool: the lowest default-sized block of the default supernet not yet in use."""
        block = self.default_blocks[v6]
        if block is None:
            raise InvalidRequest("no default IPv6 pool configured; pass --subnet")
        supernet, prefix = block
        taken = db.execute(
            "SELECT net_start, net_end FROM ipam_pools WHERE space = ? AND v6 = ?"
            " AND net_start <= ? AND net_end >= ?",
            (space, int(v6), to_key(int(supernet.broadcast_address)), to_key(int(supernet.network_address))),
        ).fetchall()
        net = lowest_free_block(supernet, prefix, [(int(s, 16), int(e, 16)) for s, e in taken])
        if net is None:
            raise Conflict(f"no free /{prefix} left in the default pool {supernet} "
                           f"(address space {space}); pass --subnet")
        pool_id = make_pool_id(space, net, None)
        self._add_pool(db, pool_id, space, net, None, options_json, auto=True)
        return pool_id, net

    def _overlapping_pool(self, db: sqlite3.Connection, space: str, net: Network) -> sqlite3.Row | None:
        return db.execute(
            "SELECT pool, sub_pool FROM ipam_pools WHERE space = ? AND v6 = ?"
            " AND net_start <= ? AND net_end >= ? ORDER BY net_start LIMIT 1",
            (space, int(net.version == 6), to_key(int(net.broadcast_address)),
             to_key(int(net.network_address))),
        ).fetchone()

    def _add_pool(self, db: sqlite3.Connection, pool_id: str, space: str, net: Network,
                  sub: Network | None, options_json: str, auto: bool) -> None:
        db.execute(
            "INSERT INTO ipam_pools (id, space, pool, sub_pool, v6, net_start, net_end, auto, refs,"
            " options) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 1, ?)",
            (pool_id, space, str(net), str(sub or ""), int(net.version == 6),
             to_key(int(net.network_address)), to_key(int(net.broadcast_address)), int(auto),
             options_json),
        )
        ranges.add_pool(db, pool_id, *usable_range(net))

    # ---- addresses -----------------------------------------------------------------------

    def request_address(self, pool_id: str, address: str, options: dict | None) -> dict:
        pool_id = text_field(pool_id, "PoolID")
        address = text_field(address, "Address")
        kind = "gateway" if options_field(options).get("RequestAddressType") == GATEWAY_REQUEST else "address"
        wanted = parse_address(address) if address else None
        with self.store.transaction() as db:
            net, sub = self._pool_networks(db, pool_id)
            if wanted is None:
                given = self._claim_lowest(db, pool_id, net, sub, kind)
            else:
                given = self._claim(db, pool_id, net, wanted, kind)
        return {"Address": f"{given}/{net.prefixlen}", "Data": {}}

    def release_address(self, pool_id: str, address: str) -> None:
        """Free an address (a shared gateway only with its last reference). Unknown: done."""
        pool_id = text_field(pool_id, "PoolID")
        address = text_field(address, "Address")
        if not address:
            raise InvalidRequest("ReleaseAddress needs an Address")
        freed = parse_address(address)
        with self.store.transaction() as db:
            pool = db.execute("SELECT v6 FROM ipam_pools WHERE id = ?", (pool_id,)).fetchone()
            # Hex keys of both families share one number space: never match across families.
            if pool is not None and bool(pool["v6"]) == (freed.version == 6):
                self._release(db, pool_id, int(freed))

    def _release(self, db: sqlite3.Connection, pool_id: str, value: int) -> None:
        key = (pool_id, to_key(value))
        held = db.execute("SELECT refs FROM ipam_addresses WHERE pool_id = ? AND addr = ?", key).fetchone()
        if held is None:
            return
        if held["refs"] > 1:
            db.execute("UPDATE ipam_addresses SET refs = refs - 1 WHERE pool_id = ? AND addr = ?", key)
            return
        db.execute("DELETE FROM ipam_addresses WHERE pool_id = ? AND addr = ?", key)
        ranges.give_back(db, pool_id, value)

    def _pool_networks(self, db: sqlite3.Connection, pool_id: str) -> tuple[Network, Network | None]:
        row = db.execute("SELECT pool, sub_pool FROM ipam_pools WHERE id = ?", (pool_id,)).fetchone()
        if row is None:
            raise NotFound(f"pool {pool_id} not found")
        sub = parse_network(row["sub_pool"], "ip-range") if row["sub_pool"] else None
        return parse_network(row["pool"], "subnet"), sub

    def _claim_lowest(self, db: sqlite3.Connection, pool_id: str, net: Network, sub: Network | None,
                      kind: str) -> Address:
        lo, hi = allocation_range(net, sub)
        value = ranges.take_lowest(db, pool_id, lo, hi)
        if value is None:
            where = f"ip-range {sub} of pool {net}" if sub is not None else f"pool {net}"
            raise Conflict(f"no free address in {where}")
        self._record(db, pool_id, value, kind)
        return type(net.network_address)(value)

    def _claim(self, db: sqlite3.Connection, pool_id: str, net: Network, wanted: Address,
               kind: str) -> Address:
        """An explicit --ip or --gateway. A gateway already held as gateway is shared (refs + 1):
        two networks on one pool use the same gateway."""
        check_assignable(wanted, net)
        key = (pool_id, to_key(int(wanted)))
        held = db.execute("SELECT kind FROM ipam_addresses WHERE pool_id = ? AND addr = ?", key).fetchone()
        if held is not None and kind == "gateway" and held["kind"] == "gateway":
            db.execute("UPDATE ipam_addresses SET refs = refs + 1 WHERE pool_id = ? AND addr = ?", key)
            return wanted
        # The free-range table has the last word: never hand out an address twice.
        if held is not None or not ranges.take(db, pool_id, int(wanted)):
            raise Conflict(f"address {wanted} is already in use in pool {net}")
        self._record(db, pool_id, int(wanted), kind)
        return wanted

    def _record(self, db: sqlite3.Connection, pool_id: str, value: int, kind: str) -> None:
        db.execute(
            "INSERT INTO ipam_addresses (pool_id, addr, kind, refs) VALUES (?, ?, ?, 1)",
            (pool_id, to_key(value), kind),
        )

    # ---- status --------------------------------------------------------------------------

    def pools(self) -> list[dict]:
        rows = self.store.read().execute(
            "SELECT p.id, p.space, p.pool, p.sub_pool, p.v6, p.auto, p.refs,"
            " (SELECT COUNT(*) FROM ipam_addresses a WHERE a.pool_id = p.id) AS in_use"
            " FROM ipam_pools p ORDER BY p.space, p.v6, p.net_start, p.id"
        ).fetchall()
        return [
            {"id": r["id"], "space": r["space"], "pool": r["pool"], "sub_pool": r["sub_pool"],
             "v6": bool(r["v6"]), "auto": bool(r["auto"]), "refs": r["refs"], "in_use": r["in_use"]}
            for r in rows
        ]

    def addresses(self, pool_id: str) -> list[tuple[str, str]]:
        """(address, "gateway" or "address") of a pool's allocations ([] if unknown)."""
        rows = self.store.read().execute(
            "SELECT a.addr, a.kind, p.v6 FROM ipam_addresses a JOIN ipam_pools p ON p.id = a.pool_id"
            " WHERE a.pool_id = ? ORDER BY a.addr",
            (pool_id,),
        ).fetchall()
        return [(str(from_key(r["addr"], bool(r["v6"]))), r["kind"]) for r in rows]

    def allocated(self, pool_id: str) -> list[str]:
        """Addresses in use in a pool, gateway included, in numeric order ([] if unknown)."""
        rows = self.store.read().execute(
            "SELECT a.addr, p.v6 FROM ipam_addresses a JOIN ipam_pools p ON p.id = a.pool_id"
            " WHERE a.pool_id = ? ORDER BY a.addr",
            (pool_id,),
        ).fetchall()
        return [str(from_key(r["addr"], bool(r["v6"]))) for r in rows]

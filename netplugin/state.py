"""Persisted networks and endpoints (SQLite, shared by all gunicorn workers).

A network row is written with status "creating" before any kernel change and set to "ready" after, and
to "deleting" before teardown, so start-up reconciliation can finish or undo an operation that a crash
interrupted (the row is the transaction record).
"""
import json
import sqlite3
import time
from dataclasses import asdict, dataclass, field

from plugincore.errors import Conflict, InvalidRequest, NotFound

NETWORK_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS networks (
        id TEXT PRIMARY KEY,
        mode TEXT NOT NULL,
        status TEXT NOT NULL,
        parent TEXT,
        options TEXT NOT NULL,
        ipv4 TEXT NOT NULL,
        ipv6 TEXT NOT NULL,
        kernel TEXT NOT NULL,
        created_at REAL NOT NULL)""",
    # A parent NIC carries at most one network: the unique index is the cross-process claim.
    "CREATE UNIQUE INDEX IF NOT EXISTS networks_parent ON networks(parent) WHERE parent IS NOT NULL",
    """CREATE TABLE IF NOT EXISTS endpoints (
        id TEXT PRIMARY KEY,
        network_id TEXT NOT NULL,
        address TEXT NOT NULL,
        address6 TEXT NOT NULL,
        mac TEXT NOT NULL,
        options TEXT NOT NULL,
        kernel TEXT NOT NULL,
        sandbox TEXT NOT NULL,
        created_at REAL NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS endpoints_network ON endpoints(network_id)",
]

CREATING, READY, DELETING = "creating", "ready", "deleting"


@dataclass
class Network:
    id: str
    mode: str
    options: dict  # validated mode options
    ipv4: list = field(default_factory=list)  # Docker's IPv4Data
    ipv6: list = field(default_factory=list)
    parent: str | None = None  # the NIC this network claims exclusively
    status: str = CREATING
    kernel: dict = field(default_factory=dict)  # what the mode created or changed, to undo exactly that

    @property
    def gateway(self) -> str | None:
        return _gateway(self.ipv4)

    @property
    def gateway6(self) -> str | None:
        return _gateway(self.ipv6)


def _gateway(data: list) -> str | None:
    for entry in data or []:
        if entry.get("Gateway"):
            return entry["Gateway"].split("/")[0]
    return None


@dataclass
class Endpoint:
    id: str
    network_id: str
    address: str = ""  # CIDR as Docker gave it
    address6: str = ""
    mac: str = ""
    options: dict = field(default_factory=dict)
    kernel: dict = field(default_factory=dict)  # link names
    sandbox: str = ""  # SandboxKey while joined


_JSON_NET = ("options", "ipv4", "ipv6", "kernel")
_JSON_EP = ("options", "kernel")


def _row_to(cls, row: sqlite3.Row, json_fields):
    data = {k: row[k] for k in row.keys() if k != "created_at"}
    for key in json_fields:
        data[key] = json.loads(data[key])
    return cls(**data)


class NetworkState:
    def __init__(self, store):
        self.store = store

    # networks
    def claim_network(self, net: Network) -> None:
        """Insert ``net``; Conflict if its parent is already claimed by another network."""
        row = asdict(net)
        for key in _JSON_NET:
            row[key] = json.dumps(row[key])
        row["created_at"] = time.time()
        try:
            with self.store.transaction() as db:
                db.execute(f"INSERT INTO networks ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                           list(row.values()))
        except sqlite3.IntegrityError:
            other = self.network_on_parent(net.parent)
            raise Conflict(f"parent {net.parent} is already used by network "
                           f"{other.id[:12] if other else 'being created'}") from None

    def network_on_parent(self, parent: str) -> Network | None:
        row = self.store.read().execute("SELECT * FROM networks WHERE parent = ?", (parent,)).fetchone()
        return _row_to(Network, row, _JSON_NET) if row else None

    def get_network(self, network_id: str) -> Network | None:
        row = self.store.read().execute("SELECT * FROM networks WHERE id = ?", (network_id,)).fetchone()
        return _row_to(Network, row, _JSON_NET) if row else None

    def networks(self) -> list[Network]:
        rows = self.store.read().execute("SELECT * FROM networks ORDER BY created_at").fetchall()
        return [_row_to(Network, r, _JSON_NET) for r in rows]

    def set_network_status(self, network_id: str, status: str, kernel: dict | None = None) -> None:
        with self.store.transaction() as db:
            if kernel is None:
                db.execute("UPDATE networks SET status = ? WHERE id = ?", (status, network_id))
            else:
                db.execute("UPDATE networks SET status = ?, kernel = ? WHERE id = ?",
                           (status, json.dumps(kernel), network_id))

    def drop_network(self, network_id: str) -> None:
        with self.store.transaction() as db:
            db.execute("DELETE FROM endpoints WHERE network_id = ?", (network_id,))
            db.execute("DELETE FROM networks WHERE id = ?", (network_id,))

    # endpoints
    def put_endpoint(self, ep: Endpoint) -> None:
        """Record a new endpoint. Never over an existing one: that would forget its veth and traffic
        class (found by fuzzing: a second CreateEndpoint with the same ID leaked both)."""
        row = asdict(ep)
        for key in _JSON_EP:
            row[key] = json.dumps(row[key])
        row["created_at"] = time.time()
        with self.store.transaction() as db:
            try:
                db.execute(f"INSERT INTO endpoints ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                           list(row.values()))
            except sqlite3.IntegrityError:
                raise Conflict(f"endpoint {ep.id[:12]} already exists") from None

    def get_endpoint(self, endpoint_id: str) -> Endpoint | None:
        row = self.store.read().execute("SELECT * FROM endpoints WHERE id = ?", (endpoint_id,)).fetchone()
        return _row_to(Endpoint, row, _JSON_EP) if row else None

    def find_endpoint(self, text: str) -> Endpoint:
        """An endpoint by ID or unique ID prefix (at least 6 characters), as people type them."""
        if not isinstance(text, str) or not 6 <= len(text) <= 128 or not text.isalnum():
            raise InvalidRequest(f"endpoint {text!r} is not an endpoint ID or a prefix of at least 6 characters")
        rows = self.store.read().execute("SELECT * FROM endpoints WHERE id LIKE ? || '%' LIMIT 2",
                                         (text.lower(),)).fetchall()
        if not rows:
            raise NotFound(f"no endpoint {text} on this host")
        if len(rows) > 1:
            raise InvalidRequest(f"endpoint prefix {text} is ambiguous: give more characters")
        return _row_to(Endpoint, rows[0], _JSON_EP)

    def endpoints(self, network_id: str | None = None) -> list[Endpoint]:
        db = self.store.read()
        if network_id is None:
            rows = db.execute("SELECT * FROM endpoints ORDER BY created_at").fetchall()
        else:
            rows = db.execute("SELECT * FROM endpoints WHERE network_id = ? ORDER BY created_at",
                              (network_id,)).fetchall()
        return [_row_to(Endpoint, r, _JSON_EP) for r in rows]

    def set_endpoint_join(self, endpoint_id: str, sandbox: str, kernel: dict) -> None:
        with self.store.transaction() as db:
            db.execute("UPDATE endpoints SET sandbox = ?, kernel = ? WHERE id = ?",
                       (sandbox, json.dumps(kernel), endpoint_id))

    def drop_endpoint(self, endpoint_id: str) -> None:
        with self.store.transaction() as db:
            db.execute("DELETE FROM endpoints WHERE id = ?", (endpoint_id,))

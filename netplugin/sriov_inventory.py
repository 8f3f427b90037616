"""The persisted SR-IOV VF inventory: which VF of which PF belongs to which network's pool, and which
endpoint holds it. One table in the shared SQLite store; a claim is one ``BEGIN IMMEDIATE``
transaction, so two gunicorn workers never hand out the same VF.
"""
import time
from dataclasses import dataclass

from plugincore.errors import BackendError, Conflict

SRIOV_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS sriov_vfs (
        pf TEXT NOT NULL,
        vf INTEGER NOT NULL,
        pci TEXT NOT NULL,          -- the VF's PCI address (stable while the VFs stay enabled)
        netdev TEXT NOT NULL,       -- its netdev's name in the host (given back on release)
        network_id TEXT NOT NULL,   -- whose pool it is in
        endpoint_id TEXT UNIQUE,    -- the claim; NULL while free
        claimed_at REAL,
        PRIMARY KEY (pf, vf))""",
    "CREATE INDEX IF NOT EXISTS sriov_vfs_network ON sriov_vfs(network_id)",
]
_COLUMNS = "pf, vf, pci, netdev, network_id, endpoint_id"


@dataclass(frozen=True)
class Vf:
    pf: str
    vf: int
    pci: str
    netdev: str
    network_id: str
    endpoint_id: str | None


def _vf(row) -> Vf:
    return Vf(*row)


class Inventory:
    def __init__(self, store):
        self.store = store

    def register(self, network_id: str, pf: str, vfs: dict[int, tuple[str, str]]) -> None:
        """Make ``vfs`` ({vf: (pci, netdev)}) the pool of ``network_id``. Idempotent (start-up repair
        calls it again): claims survive; rows of a vanished network on this PF are taken over."""
        with self.store.transaction() as db:
            for vf, (pci, netdev) in sorted(vfs.items()):
                db.execute(
                    "INSERT INTO sriov_vfs (pf, vf, pci, netdev, network_id) VALUES (?, ?, ?, ?, ?) "
                    "ON CONFLICT (pf, vf) DO UPDATE SET pci = excluded.pci, "
                    "network_id = excluded.network_id, "
                    "netdev = CASE WHEN excluded.netdev != '' THEN excluded.netdev "
                    "ELSE sriov_vfs.netdev END, "
                    "endpoint_id = CASE WHEN sriov_vfs.network_id = excluded.network_id "
                    "THEN sriov_vfs.endpoint_id END",
                    (pf, vf, pci, netdev, network_id))
            marks = ", ".join("?" * len(vfs))
            db.execute(f"DELETE FROM sriov_vfs WHERE network_id = ? AND endpoint_id IS NULL "
                       f"AND (pf != ? OR vf NOT IN ({marks}))", (network_id, pf, *sorted(vfs)))

    def claim(self, network_id: str, endpoint_id: str, usable=lambda vf: True) -> Vf:
        """The VF held by ``endpoint_id``, or the lowest free one of the network's pool for which
        ``usable(vf)`` holds (its netdev is at home). Conflict naming the PF and count when none is."""
        with self.store.transaction() as db:
            held = db.execute(f"SELECT {_COLUMNS} FROM sriov_vfs WHERE endpoint_id = ?",
                              (endpoint_id,)).fetchone()
            if held is not None:
                return _vf(held)
            pool = [_vf(r) for r in db.execute(
                f"SELECT {_COLUMNS} FROM sriov_vfs WHERE network_id = ? ORDER BY vf", (network_id,))]
            if not pool:
                raise BackendError(f"network {network_id[:12]} has no VF inventory (restart the plugin "
                                   "to rebuild it)")
            elsewhere = 0
            for vf in pool:
                if vf.endpoint_id is not None:
                    continue
                if not usable(vf):
                    elsewhere += 1
                    continue
                db.execute("UPDATE sriov_vfs SET endpoint_id = ?, claimed_at = ? WHERE pf = ? AND vf = ?",
                           (endpoint_id, time.time(), vf.pf, vf.vf))
                return Vf(vf.pf, vf.vf, vf.pci, vf.netdev, vf.network_id, endpoint_id)
            busy = len(pool) - elsewhere
            detail = f"; {elsewhere} more not in this host's namespace" if elsewhere else ""
            raise Conflict(f"no free VF on PF {pool[0].pf}: {busy} of {len(pool)} VFs of network "
                           f"{network_id[:12]} are in use{detail}")

    def claimed_by(self, endpoint_id: str) -> Vf | None:
        row = self.store.read().execute(f"SELECT {_COLUMNS} FROM sriov_vfs WHERE endpoint_id = ?",
                                        (endpoint_id,)).fetchone()
        return _vf(row) if row else None

    def release(self, endpoint_id: str) -> None:
        with self.store.transaction() as db:
            db.execute("UPDATE sriov_vfs SET endpoint_id = NULL, claimed_at = NULL WHERE endpoint_id = ?",
                       (endpoint_id,))

    def pool(self, network_id: str | None = None) -> list[Vf]:
        db = self.store.read()
        if network_id is None:
            rows = db.execute(f"SELECT {_COLUMNS} FROM sriov_vfs ORDER BY pf, vf")
        else:
            rows = db.execute(f"SELECT {_COLUMNS} FROM sriov_vfs WHERE network_id = ? ORDER BY vf",
                              (network_id,))
        return [_vf(r) for r in rows]

    def forget_network(self, network_id: str) -> None:
        with self.store.transaction() as db:
            db.execute("DELETE FROM sriov_vfs WHERE network_id = ?", (network_id,))

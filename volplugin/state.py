"""This host's volume state: known volumes, what is attached and mounted here, and the persisted SET of
Docker caller IDs per volume (a set, not a counter: a repeated Unmount can never count twice)."""
import json
import time

VOLUME_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS volumes (
        name TEXT PRIMARY KEY,
        options TEXT NOT NULL,
        backend_data TEXT NOT NULL,
        status TEXT NOT NULL,
        created_at TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS attachments (
        volume TEXT PRIMARY KEY,
        device TEXT NOT NULL,
        mountpoint TEXT NOT NULL,
        attached_at REAL NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS mount_ids (
        volume TEXT NOT NULL,
        caller TEXT NOT NULL,
        mounted_at REAL NOT NULL,
        PRIMARY KEY (volume, caller))""",
]
CREATING, READY = "creating", "ready"


def rfc3339(ts: float | None = None) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts if ts is not None else time.time()))


class VolumeState:
    def __init__(self, store):
        self.store = store

    def put_volume(self, name: str, options: dict, backend_data: dict, status: str,
                   created_at: str | None = None) -> None:
        with self.store.transaction() as db:
            db.execute("INSERT OR REPLACE INTO volumes VALUES (?, ?, ?, ?, ?)",
                       (name, json.dumps(options), json.dumps(backend_data), status, created_at or rfc3339()))

    def volume(self, name: str) -> dict | None:
        row = self.store.read().execute("SELECT * FROM volumes WHERE name = ?", (name,)).fetchone()
        return _volume(row) if row else None

    def volumes(self) -> list[dict]:
        return [_volume(r) for r in self.store.read().execute("SELECT * FROM volumes ORDER BY name")]

    def drop_volume(self, name: str) -> None:
        with self.store.transaction() as db:
            for table, key in (("mount_ids", "volume"), ("attachments", "volume"), ("volumes", "name")):
                db.execute(f"DELETE FROM {table} WHERE {key} = ?", (name,))

    def attachment(self, name: str) -> dict | None:
        row = self.store.read().execute("SELECT * FROM attachments WHERE volume = ?", (name,)).fetchone()
        return dict(row) if row else None

    def attachments(self) -> list[dict]:
        return [dict(r) for r in self.store.read().execute("SELECT * FROM attachments")]

    def record_mount(self, name: str, caller: str, device: str, mountpoint: str) -> None:
        """The attachment and the first caller, in one transaction."""
        with self.store.transaction() as db:
            db.execute("INSERT OR REPLACE INTO attachments VALUES (?, ?, ?, ?)",
                       (name, device, mountpoint, time.time()))
            db.execute("INSERT OR IGNORE INTO mount_ids VALUES (?, ?, ?)", (name, caller, time.time()))

    def add_caller(self, name: str, caller: str) -> None:
        with self.store.transaction() as db:
            db.execute("INSERT OR IGNORE INTO mount_ids VALUES (?, ?, ?)", (name, caller, time.time()))

    def remove_caller(self, name: str, caller: str) -> tuple[bool, int]:
        """Forget ``caller``; returns (it was known, callers left)."""
        with self.store.transaction() as db:
            known = db.execute("DELETE FROM mount_ids WHERE volume = ? AND caller = ?", (name, caller)).rowcount
            left = db.execute("SELECT COUNT(*) FROM mount_ids WHERE volume = ?", (name,)).fetchone()[0]
        return bool(known), left

    def callers(self, name: str) -> list[str]:
        rows = self.store.read().execute("SELECT caller FROM mount_ids WHERE volume = ? ORDER BY mounted_at",
                                         (name,))
        return [r[0] for r in rows]

    def drop_attachment(self, name: str) -> None:
        with self.store.transaction() as db:
            db.execute("DELETE FROM mount_ids WHERE volume = ?", (name,))
            db.execute("DELETE FROM attachments WHERE volume = ?", (name,))


def _volume(row) -> dict:
    return {"name": row["name"], "options": json.loads(row["options"]),
            "backend_data": json.loads(row["backend_data"]), "status": row["status"],
            "created_at": row["created_at"]}

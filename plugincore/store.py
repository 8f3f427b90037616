"""SQLite state store: crash-safe (WAL, synchronous=FULL) and safe across gunicorn workers.

Every change runs in ``BEGIN IMMEDIATE``, which takes SQLite's write lock up front, so two worker
processes can never interleave a read-check-write sequence.
"""
import contextlib
import os
import sqlite3
import threading


class Store:
    def __init__(self, path: str, schema: list[str], busy_timeout: float = 30.0):
        self.path = path
        self.schema = schema
        self.busy_timeout = busy_timeout
        os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
        self._local = threading.local()
        with self.transaction() as db:
            for statement in schema:
                db.execute(statement)
        os.chmod(path, 0o600)

    def _connection(self) -> sqlite3.Connection:
        # A connection must never cross a fork (gunicorn forks workers after start-up work).
        conn = getattr(self._local, "conn", None)
        if conn is None or self._local.pid != os.getpid():
            conn = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            self._local.conn, self._local.pid = conn, os.getpid()
        return conn

    @contextlib.contextmanager
    def transaction(self):
        """Yield a connection inside an IMMEDIATE transaction; commit on success, roll back on error."""
        conn = self._connection()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def read(self) -> sqlite3.Connection:
        """A connection for plain reads (each statement sees a consistent snapshot)."""
        return self._connection()

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None and self._local.pid == os.getpid():
            conn.close()
        self._local.conn = None

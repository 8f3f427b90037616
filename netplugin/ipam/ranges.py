"""Free-range bookkeeping: each pool keeps its unallocated addresses as disjoint inclusive ranges.

Allocating or releasing one address reads and rewrites at most two ranges, found by index seeks,
so the cost does not grow with the number of addresses in use (scanning the allocated addresses,
as a naive allocator would, makes a busy /16 slower with every container).

All functions take the connection of the caller's open transaction and work on integers.
"""
import sqlite3

from .cidr import to_key

SCHEMA = [
    # Ranges are disjoint, so both start_addr and end_addr are unique and ordered the same way.
    """CREATE TABLE IF NOT EXISTS ipam_free (
        pool_id    TEXT NOT NULL,
        start_addr TEXT NOT NULL,
        end_addr   TEXT NOT NULL,
        PRIMARY KEY (pool_id, start_addr)
    ) WITHOUT ROWID""",
    "CREATE UNIQUE INDEX IF NOT EXISTS ipam_free_end ON ipam_free (pool_id, end_addr)",
]


def add_pool(db: sqlite3.Connection, pool_id: str, first: int, last: int) -> None:
    """A new pool starts with its whole usable range free."""
    _insert(db, pool_id, first, last)


def drop_pool(db: sqlite3.Connection, pool_id: str) -> None:
    db.execute("DELETE FROM ipam_free WHERE pool_id = ?", (pool_id,))


def take_lowest(db: sqlite3.Connection, pool_id: str, lo: int, hi: int) -> int | None:
    """Mark the lowest free address in [lo, hi] as used and return it; None if there is none."""
    found = _first_ending_at_or_after(db, pool_id, lo)
    if found is None or found[0] > hi:
        return None
    value = max(found[0], lo)
    _carve(db, pool_id, found, value)
    return value


def take(db: sqlite3.Connection, pool_id: str, value: int) -> bool:
    """Mark one address as used; False if it is not free."""
    found = _first_ending_at_or_after(db, pool_id, value)
    if found is None or found[0] > value:
        return False
    _carve(db, pool_id, found, value)
    return True


def give_back(db: sqlite3.Connection, pool_id: str, value: int) -> None:
    """Return a used address, merging it with the free ranges that end just before or start just
    after it so that the table stays as small as the fragmentation allows."""
    left = db.execute(
        "SELECT start_addr FROM ipam_free WHERE pool_id = ? AND end_addr = ?",
        (pool_id, to_key(value - 1)),
    ).fetchone()
    right = db.execute(
        "SELECT end_addr FROM ipam_free WHERE pool_id = ? AND start_addr = ?",
        (pool_id, to_key(value + 1)),
    ).fetchone()
    if right is not None:
        _delete(db, pool_id, value + 1)
    new_start = int(left["start_addr"], 16) if left is not None else value
    new_end = int(right["end_addr"], 16) if right is not None else value
    if left is not None:
        _set_end(db, pool_id, new_start, new_end)
    else:
        _insert(db, pool_id, new_start, new_end)


def _first_ending_at_or_after(db: sqlite3.Connection, pool_id: str, value: int) -> tuple[int, int] | None:
    # Ranges are disjoint and sorted, so the first one ending at or after `value` is the lowest
    # one that can contain it or lie above it: a single seek on ipam_free_end.
    row = db.execute(
        "SELECT start_addr, end_addr FROM ipam_free WHERE pool_id = ? AND end_addr >= ?"
        " ORDER BY end_addr LIMIT 1",
        (pool_id, to_key(value)),
    ).fetchone()
    return None if row is None else (int(row["start_addr"], 16), int(row["end_addr"], 16))


def _carve(db: sqlite3.Connection, pool_id: str, found: tuple[int, int], value: int) -> None:
    """Remove `value` from the free range `found` that contains it."""
    start, end = found
    if start == end:
        _delete(db, pool_id, start)
    elif value == start:
        db.execute(
            "UPDATE ipam_free SET start_addr = ? WHERE pool_id = ? AND start_addr = ?",
            (to_key(value + 1), pool_id, to_key(start)),
        )
    else:
        _set_end(db, pool_id, start, value - 1)
        if value < end:
            _insert(db, pool_id, value + 1, end)


def _insert(db: sqlite3.Connection, pool_id: str, start: int, end: int) -> None:
    db.execute(
        "INSERT INTO ipam_free (pool_id, start_addr, end_addr) VALUES (?, ?, ?)",
        (pool_id, to_key(start), to_key(end)),
    )


def _set_end(db: sqlite3.Connection, pool_id: str, start: int, end: int) -> None:
    db.execute(
        "UPDATE ipam_free SET end_addr = ? WHERE pool_id = ? AND start_addr = ?",
        (to_key(end), pool_id, to_key(start)),
    )


def _delete(db: sqlite3.Connection, pool_id: str, start: int) -> None:
    db.execute("DELETE FROM ipam_free WHERE pool_id = ? AND start_addr = ?", (pool_id, to_key(start)))

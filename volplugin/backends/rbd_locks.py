"""One writer across hosts: the ownership record of an RBD image, its holder's liveness, fencing.

Design (decided after measuring on Ceph 16.2):
- The writer lock is an *ownership record*: the image metadata key ``volplugin.owner`` (JSON: host,
  since, client addresses, attach method), written with a compare-and-swap on the image header's
  omap (``omap_cmp`` + ``set_omap`` in one RADOS write op). Only one host can turn "no owner" (or
  the exact record it read) into its own record. ``rbd image-meta get IMAGE volplugin.owner`` shows it.
- Not an advisory ``rbd lock``: with the exclusive-lock feature an advisory lock shares librbd's
  lock name, so it makes every writer (our own rbd-fuse too) fail with EROFS and ``rbd rm`` hang.
  librbd's managed exclusive lock alone is not enough either: it is cooperative (a writer on
  another host silently takes it over), and with rbd-fuse the writer is not the plugin's client.
  rbd-nbd (``--exclusive``) additionally holds it non-cooperatively (krbd cannot: rbd_devices.py).
- Liveness: the record lists the client addresses of the holder's writer (the rbd-fuse, rbd-nbd or
  kernel client, found as the new watchers after attaching). Holder alive = one of them is still
  a watcher of the image. A dead client's watch lingers ``osd_client_watch_timeout`` (30 s) after
  it died; then the first taker records ``dead_since`` in the record, and after ``fence_grace``
  more seconds a taker fences (``osd blocklist add`` of every recorded address and of any stale
  managed-lock owner: the OSDs then refuse their writes and drop their watches), breaks librbd's
  lock and swaps the record for its own. An admin can fence and break at once (``break_lock``).
- A record without addresses (an attach in progress, or a maintenance claim by remove/rollback)
  counts as alive while any client watches the image or for ``claim_ttl`` seconds.
- Blocklist entries last ``fence_expire`` (7 days by default): a frozen writer resumed later must
  still find itself fenced. Times in records are the writing host's UTC clock (RFC 3339); the grace
  assumes roughly synchronised clocks.
"""
from __future__ import annotations

import datetime as dt
import json
import logging

from plugincore.errors import BackendError, Conflict

from .base import Holder
from .rbd_cluster import rados, rbd

log = logging.getLogger("volplugin.rbd")
OWNER_KEY = "volplugin.owner"
OMAP_KEY = "metadata_" + OWNER_KEY  # how librbd stores image metadata in the header's omap
ECANCELED = 125


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


def rfc3339(when: dt.datetime) -> str:
    return when.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str) -> dt.datetime | None:
    try:
        return dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.timezone.utc)
    except (TypeError, ValueError):
        return None


def header_oid(image) -> str:
    return "rbd_header." + image.id()


def read_record(ioctx, oid: str) -> tuple[str, dict | None]:
    """The raw record (``""`` when there is none) and its decoded form."""
    with rados.ReadOpCtx() as op:
        values, _ = ioctx.get_omap_vals_by_keys(op, (OMAP_KEY,))
        ioctx.operate_read_op(op, oid)
        raw = dict(values).get(OMAP_KEY)
    if not raw:
        return "", None
    raw = raw.decode()
    try:
        record = json.loads(raw)
    except ValueError:
        record = None
    if not isinstance(record, dict) or not record.get("host"):
        record = {"host": "unknown (unreadable record)", "since": "", "addresses": []}
    return raw, record


def encode(record: dict) -> str:
    return json.dumps(record, sort_keys=True)


def swap_record(ioctx, oid: str, expected_raw: str, record: dict | None) -> bool:
    """Replace the record if it is still exactly ``expected_raw``; False if someone changed it."""
    with rados.WriteOpCtx() as op:
        op.omap_cmp(OMAP_KEY, expected_raw, rados.LIBRADOS_CMPXATTR_OP_EQ)
        if record is None:
            ioctx.remove_omap_keys(op, (OMAP_KEY,))
        else:
            ioctx.set_omap(op, (OMAP_KEY,), (encode(record).encode(),))
        try:
            ioctx.operate_write_op(op, oid)
        except rados.OSError as exc:
            if getattr(exc, "errno", None) == ECANCELED or "125" in str(exc):
                return False
            raise
    return True


def new_record(host: str, method: str = "", op: str = "") -> dict:
    record = {"host": host, "since": rfc3339(now()), "addresses": []}
    if method:
        record["method"] = method
    if op:
        record["op"] = op
    return record


def watcher_addresses(image) -> set[str]:
    return {w["addr"] for w in image.watchers_list()}


def lock_owners(image) -> list[tuple[str, str, str]]:
    """librbd's managed lock owners as (entity, cookie, address); empty when unlocked."""
    lockers = image.list_lockers()
    if not lockers:
        return []
    return [tuple(entry) for entry in lockers.get("lockers", [])]


class Assessment:
    """What a taker concludes about the current record."""

    def __init__(self, record: dict, watchers: set[str], owners: list, claim_ttl: float):
        self.record = record
        addresses = list(record.get("addresses") or [])
        since = parse_time(record.get("since", ""))
        age = (now() - since).total_seconds() if since else float("inf")
        if addresses:
            self.alive = any(a in watchers for a in addresses)
        else:
            self.alive = bool(watchers) or age < claim_ttl
        # a stale managed-lock owner (not watching) is fenced with the holder's own addresses
        stale = [addr for _, _, addr in owners if addr not in watchers]
        self.fence = sorted(set(addresses) | set(stale))
        self.unknown_watchers = sorted(watchers - set(addresses))

    def holder(self) -> Holder:
        rec = self.record
        return Holder(host=rec.get("host", ""), since=rec.get("since", ""), alive=self.alive,
                      addresses=list(rec.get("addresses") or []))


def in_use_message(name: str, pool: str, record: dict) -> str:
    what = f" ({record['op']})" if record.get("op") else ""
    return (f"volume {name} is in use on host {record.get('host')} since {record.get('since') or '?'}"
            f"{what} (image {pool}/{name})")


class Fencer:
    """Fences the dead clients of a holder, then breaks librbd's lock they still hold."""

    def __init__(self, cluster, fence_expire: float):
        self.cluster = cluster
        self.fence_expire = fence_expire

    def fence(self, name: str, addresses: list[str]) -> None:
        for address in addresses:
            log.warning("volume %s: fencing client %s (osd blocklist add)", name, address)
            self.cluster.blocklist(address, self.fence_expire, f"fencing {address} (holder of volume {name})")

    @staticmethod
    def break_stale_lock(image, name: str, fenced: list[str]) -> None:
        """Break librbd's managed lock if a fenced client still owns it (librbd would do it on the
        next writer's first write; doing it now makes the takeover deterministic)."""
        for entity, cookie, address in lock_owners(image):
            if address in fenced:
                try:
                    image.break_lock(entity, cookie)
                    log.info("volume %s: broke the lock of fenced client %s", name, address)
                except (rbd.ImageNotFound, rbd.ObjectNotFound):
                    pass  # already gone


def check_dead(name: str, pool: str, assessment: Assessment) -> None:
    """Conflict unless the holder is dead and nobody else has the image open."""
    record = assessment.record
    if assessment.alive:
        raise Conflict(in_use_message(name, pool, record))
    if assessment.unknown_watchers:
        raise Conflict(f"volume {name}: the holder {record.get('host')} is gone but clients "
                       f"{', '.join(assessment.unknown_watchers)} still have image {pool}/{name} open")


def refuse_during_grace(name: str, record: dict, fence_grace: float) -> None:
    """Conflict while ``fence_grace`` seconds have not passed since the holder was first seen dead."""
    first_dead = parse_time(record.get("dead_since", ""))
    if first_dead is None:
        return
    remaining = fence_grace - (now() - first_dead).total_seconds()
    if remaining > 0:
        when = rfc3339(first_dead + dt.timedelta(seconds=fence_grace))
        raise Conflict(f"volume {name} is held by host {record.get('host')} (since {record.get('since')}), "
                       f"whose clients stopped responding (seen at {record['dead_since']}); it can be "
                       f"taken over (fencing that host) from {when}, or now with an explicit break-lock")


def mark_dead(ioctx, oid: str, raw: str, record: dict, seen_by: str, name: str) -> dict:
    """Record when a taker first saw the holder dead (the grace counts from then)."""
    marked = dict(record, dead_since=rfc3339(now()), dead_seen_by=seen_by)
    refuse_if_changed(swap_record(ioctx, oid, raw, marked), name)
    return marked


def refuse_if_changed(ok: bool, name: str) -> None:
    if not ok:
        raise Conflict(f"volume {name}: another host changed its ownership at the same moment; try again")


def ensure_record_cleared(ioctx, oid: str, host: str) -> bool:
    """Drop the record if ``host`` holds it; True when it was ours (or there was none)."""
    for _ in range(3):
        raw, record = read_record(ioctx, oid)
        if record is None:
            return True
        if record.get("host") != host:
            return False
        if swap_record(ioctx, oid, raw, None):
            return True
    raise BackendError(f"ownership record {oid} keeps changing; could not release it")

"""The LVM thin backend: one thin LV per volume in a configured volume group and thin pool, for databases
that stay on one host (fast local disk, cheap snapshots, no storage network).

- Names: the LV is named like the volume; a snapshot ``<volume>@<snap>`` is the thin snapshot LV
  ``<volume>+<snap>`` ('+' is valid in LV names but not in volume or snapshot names, so the split is
  unambiguous). Everything volplugin creates carries the LV tag ``volplugin`` (snapshots also
  ``volplugin_snapshot``): an LV without it is never touched, and a volume name taken by a foreign LV
  is a Conflict.
- Activation: volumes are created with the activation-skip flag, so boot-time autoactivation leaves them
  alone and only the plugin activates them (``-K``); Mount activates, the last Unmount deactivates.
- Host-local: the volume record lives in this host's state (LocalOnlyCatalog); no cross-host lock exists
  or is needed, the kernel's open count is the only "holder".
- Thin pool guard: a create, grow or snapshot is refused while the pool's data or metadata is at least
  ``max_pool_percent`` full (a full thin pool freezes every volume in it: the database stops), and a
  create or grow that would provision more than ``max_overcommit`` times the pool's size; Status warns
  from ``warn_pool_percent`` on.
- Snapshots: LVM suspends (and so freezes) the origin's filesystem itself while it takes a thin
  snapshot; an fsfreeze around it would make that suspend fail with EBUSY, hence
  ``snapshot_freezes_filesystem``. Rollback replaces the volume's LV by a new thin snapshot of the
  snapshot (the snapshot itself stays, as with RBD); an interrupted rollback is finished on next use.
"""
from __future__ import annotations

import datetime as dt
import logging
import os
import re

from plugincore.errors import BackendError, Conflict, InvalidRequest, NotFound
from plugincore.locks import LockDir

from .base import Backend, Holder, LocalOnlyCatalog, VolumeSpec
from .lvm_command import Lvm, LvmNotFound, number, percent

log = logging.getLogger("volplugin.lvm")
TAG = "volplugin"
SNAPSHOT_TAG = "volplugin_snapshot"
SEP = "+"  # <volume>+<snapshot>
ROLLBACK_SUFFIX = SEP + "_rollback"  # snapshot names start with a letter or digit: never a snapshot's
LV_NAME_MAX = 127
VG_NAME = re.compile(r"^[A-Za-z0-9_.+][A-Za-z0-9_.+-]{0,126}$")
# LVM reserves these for its internal LVs (lvcreate refuses them with exit status 3).
_RESERVED_PARTS = ("_cdata", "_cmeta", "_corig", "_cpool", "_cvol", "_mimage", "_mlog", "_pmspare",
                   "_rimage", "_rmeta", "_tdata", "_tmeta", "_vdata", "_vorigin", "_wcorig")
_RESERVED_PREFIXES = ("snapshot", "pvmove")
FIELDS = "lv_name,lv_size,lv_tags,origin,pool_lv,lv_active,lv_dm_path,data_percent,metadata_percent," \
         "lv_time,lv_device_open,segtype,vg_extent_size"


def check_vg_name(name: str, what: str) -> str:
    if not isinstance(name, str) or not VG_NAME.match(name) or name in (".", ".."):
        raise InvalidRequest(f"{what} {name!r} is invalid: use letters, digits, '_', '.', '+', '-'")
    return name


class LvmBackend(Backend, LocalOnlyCatalog):
    name = "lvm"
    host_local = True
    snapshot_freezes_filesystem = True

    def __init__(self, *, vg: str, thin_pool: str, host_id: str, state_dir: str, timeout: float = 60.0,
                 monitoring: bool = True, max_overcommit: float = 4.0, max_pool_percent: float = 90.0,
                 warn_pool_percent: float = 80.0):
        self.vg = check_vg_name(vg, "volume group")
        self.pool = check_vg_name(thin_pool, "thin pool")
        if not 0 < warn_pool_percent <= max_pool_percent <= 100 or max_overcommit <= 0:
            raise ValueError("need 0 < warn_pool_percent <= max_pool_percent <= 100 and max_overcommit > 0")
        self.host_id = host_id
        self.max_overcommit, self.max_pool_percent = max_overcommit, max_pool_percent
        self.warn_pool_percent = warn_pool_percent
        self.lvm = Lvm(timeout=timeout, monitoring=monitoring)
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        self.locks = LockDir(os.path.join(state_dir, "locks"))

    # --- names and lookups --------------------------------------------------------------------------

    def validate_name(self, name: str) -> None:
        """What LVM would refuse, refused before anything is created."""
        if any(part in name for part in _RESERVED_PARTS) or name.startswith(_RESERVED_PREFIXES):
            raise InvalidRequest(f"volume name {name!r} cannot be an LVM volume name: LVM reserves names "
                                 f"starting with {' or '.join(_RESERVED_PREFIXES)} and containing "
                                 f"{', '.join(_RESERVED_PARTS)}")

    def _where(self, spec: VolumeSpec) -> tuple[str, str]:
        data = spec.backend_data or {}
        return data.get("vg") or self.vg, data.get("thin_pool") or data.get("pool") or self.pool

    def _rows(self, vg: str) -> list[dict]:
        """Every LV of the volume group, one ``lvs`` call (pool usage and lookups come from the same report)."""
        try:
            return self.lvm.report("lvs", vg, fields=FIELDS, what=f"listing volume group {vg}")
        except LvmNotFound:
            raise BackendError(f"volume group {vg} does not exist (see `volplugin lvm-setup`)") from None

    @staticmethod
    def _find(rows: list[dict], lv: str) -> dict | None:
        return next((r for r in rows if r["lv_name"] == lv), None)

    @staticmethod
    def _ours(row: dict) -> bool:
        # thin LVs only: the thin pool `lvm-setup` made carries the tag too
        return TAG in row["lv_tags"].split(",") and row["segtype"] == "thin"

    @staticmethod
    def _is_snapshot(row: dict) -> bool:
        return SNAPSHOT_TAG in row["lv_tags"].split(",")

    def _volume_row(self, spec: VolumeSpec, rows: list[dict] | None = None) -> dict | None:
        """The volume's LV (finishing an interrupted rollback first), None if it does not exist;
        Conflict if the name belongs to an LV that is not volplugin's."""
        vg, _ = self._where(spec)
        rows = self._rows(vg) if rows is None else rows
        row = self._find(rows, spec.name)
        if row is None and self._find(rows, spec.name + ROLLBACK_SUFFIX) is not None:
            self._finish_rollback(vg, spec.name)
            rows = self._rows(vg)
            row = self._find(rows, spec.name)
        if row is not None and (not self._ours(row) or self._is_snapshot(row)):
            raise Conflict(f"logical volume {vg}/{spec.name} exists and is not a volplugin volume")
        return row

    def _snapshot_rows(self, spec: VolumeSpec, rows: list[dict]) -> list[dict]:
        prefix = spec.name + SEP
        found = [r for r in rows if r["lv_name"].startswith(prefix) and self._is_snapshot(r)]
        return sorted(found, key=lambda r: r["lv_time"])

    # --- the thin pool guard ------------------------------------------------------------------------

    def pool_usage(self, vg: str, pool: str, rows: list[dict] | None = None) -> dict:
        rows = self._rows(vg) if rows is None else rows
        row = self._find(rows, pool)
        if row is None or row["segtype"] != "thin-pool":
            raise NotFound(f"thin pool {vg}/{pool} does not exist")
        size = number(row["lv_size"])
        # Snapshots share blocks with their origin until they diverge: the fullness limit covers them.
        provisioned = sum(number(r["lv_size"]) for r in rows
                          if r["pool_lv"] == pool and not self._is_snapshot(r))
        usage = {"vg": vg, "thin_pool": pool, "size": size, "provisioned": provisioned,
                 "overcommit": round(provisioned / size, 3) if size else 0.0,
                 "data_percent": percent(row["data_percent"]),
                 "metadata_percent": percent(row["metadata_percent"])}
        fullest = max(usage["data_percent"], usage["metadata_percent"])
        if fullest >= self.warn_pool_percent:
            usage["warning"] = (f"thin pool {vg}/{pool} is {fullest:g}% full: a full thin pool freezes every "
                                "volume in it; grow it (lvextend) or remove volumes or snapshots")
        return usage

    def _guard(self, vg: str, pool: str, rows: list[dict], what: str, extra: int = 0) -> None:
        usage = self.pool_usage(vg, pool, rows)
        for kind in ("data", "metadata"):
            if usage[f"{kind}_percent"] >= self.max_pool_percent:
                raise Conflict(f"{what} refused: thin pool {vg}/{pool} {kind} is {usage[f'{kind}_percent']:g}% "
                               f"full (limit {self.max_pool_percent:g}%); grow the pool (lvextend) or remove "
                               "volumes or snapshots")
        if extra and usage["provisioned"] + extra > self.max_overcommit * usage["size"]:
            ratio = (usage["provisioned"] + extra) / usage["size"]
            raise Conflict(f"{what} refused: it would provision {ratio:.2f}x thin pool {vg}/{pool} "
                           f"({usage['size']} bytes; limit {self.max_overcommit:g}x)")

    def _pool_lock(self, vg: str, pool: str):
        return self.locks.hold("pool-" + re.sub(r"[^A-Za-z0-9_.-]", "_", f"{vg}-{pool}"), timeout=120)

    # --- create / remove / exists -------------------------------------------------------------------

    def create(self, spec: VolumeSpec, clone_from: tuple[str, str] | None = None) -> dict:
        self.validate_name(spec.name)
        vg, pool = self._where(spec)
        data = {"vg": vg, "thin_pool": pool}
        with self._pool_lock(vg, pool):
            rows = self._rows(vg)
            source = None
            if clone_from:
                source = self._find(rows, SEP.join(clone_from))
                if source is None or not self._is_snapshot(source):
                    raise NotFound(f"snapshot {clone_from[0]}@{clone_from[1]} does not exist (volume group {vg})")
                if source["pool_lv"] != pool:
                    raise InvalidRequest(f"a clone lives in its source's thin pool {source['pool_lv']}, not {pool}")
            size = max(spec.size, number(source["lv_size"]) if source else 0)
            if source is not None and 0 < spec.size < number(source["lv_size"]):
                raise InvalidRequest(f"volume {spec.name}: a clone cannot be smaller than its source "
                                     f"{clone_from[0]}@{clone_from[1]} ({source['lv_size']} bytes)")
            existing = self._volume_row(spec, rows)
            if existing is not None:
                self._check_existing(spec, existing, size, clone_from)
                return data
            self._guard(vg, pool, rows, f"creating volume {spec.name}", extra=size)
            tags = ("--addtag", TAG, "--setactivationskip", "y", "-y")
            if source is not None:
                self.lvm("lvcreate", "-s", f"{vg}/{source['lv_name']}", "-n", spec.name, *tags,
                         what=f"cloning {clone_from[0]}@{clone_from[1]} as volume {spec.name}")
                if size > number(source["lv_size"]):
                    self._extend(vg, spec.name, size, undo_on_failure=True)
            else:
                self.lvm("lvcreate", "-T", f"{vg}/{pool}", "-V", f"{size}b", "-n", spec.name, *tags,
                         what=f"creating volume {spec.name}")
        log.info("created thin LV %s/%s (%d bytes%s)", vg, spec.name, size,
                 f", clone of {clone_from[0]}@{clone_from[1]}" if clone_from else "")
        return data

    def _check_existing(self, spec, row, size, clone_from) -> None:
        have = number(row["lv_size"])
        if not size <= have < size + number(row["vg_extent_size"]):  # LVM rounds up to whole extents
            raise Conflict(f"volume {spec.name} already exists with a different size ({have} bytes, asked {size})")
        if clone_from is not None and row["origin"] not in ("", SEP.join(clone_from)):
            raise Conflict(f"volume {spec.name} already exists and is not a clone of {clone_from[0]}@{clone_from[1]}")

    def _extend(self, vg: str, lv: str, size: int, undo_on_failure: bool = False) -> None:
        try:
            self.lvm("lvextend", "-L", f"{size}b", f"{vg}/{lv}", what=f"growing {vg}/{lv}")
        except BackendError:
            if undo_on_failure:  # no half-made clone left behind
                self.lvm("lvremove", "-y", f"{vg}/{lv}", what=f"removing half-made {vg}/{lv}")
            raise

    def exists(self, spec: VolumeSpec) -> bool:
        return self._volume_row(spec) is not None

    def remove(self, spec: VolumeSpec) -> None:
        """Remove the volume's LV, then its snapshots (clones made from them keep working: thin
        snapshots share blocks, not identity). Refused while the LV is open (mounted) anywhere."""
        vg, _ = self._where(spec)
        rows = self._rows(vg)
        row = self._volume_row(spec, rows)
        if row is not None:
            if row["lv_device_open"] == "open":
                raise Conflict(f"volume {spec.name} is in use on this host (LV {vg}/{spec.name} is open)")
            self._lvremove(vg, spec.name)
        for snap in self._snapshot_rows(spec, rows):
            self._lvremove(vg, snap["lv_name"])
        if row is None:
            log.warning("remove of volume %s: LV %s/%s does not exist; nothing to do", spec.name, vg, spec.name)

    def _lvremove(self, vg: str, lv: str) -> None:
        try:
            self.lvm("lvremove", "-y", f"{vg}/{lv}", what=f"removing {vg}/{lv}")
        except LvmNotFound:
            pass

    # --- attach / detach ----------------------------------------------------------------------------

    def attach(self, spec: VolumeSpec) -> str:
        vg, _ = self._where(spec)
        row = self._volume_row(spec)
        if row is None:
            raise NotFound(f"volume {spec.name}: logical volume {vg}/{spec.name} does not exist")
        if row["lv_active"] != "active":
            self.lvm("lvchange", "-ay", "-K", f"{vg}/{spec.name}", what=f"activating volume {spec.name}")
        device = row["lv_dm_path"]
        if not os.path.exists(device):
            raise BackendError(f"volume {spec.name}: {device} is missing after activation")
        return device

    def detach(self, spec: VolumeSpec) -> None:
        vg, _ = self._where(spec)
        try:
            self.lvm("lvchange", "-an", f"{vg}/{spec.name}", what=f"deactivating volume {spec.name}")
        except LvmNotFound:
            pass

    def attached(self) -> dict[str, str]:
        """Active volumes in every volume group: a volume stays in the one it was created in when the
        configured ``vg`` changes, and start-up reconciliation must still see it."""
        rows = self.lvm.report("lvs", fields=FIELDS, what="listing logical volumes")
        return {r["lv_name"]: r["lv_dm_path"] for r in rows
                if self._ours(r) and not self._is_snapshot(r) and r["lv_active"] == "active"}

    def holder(self, spec: VolumeSpec) -> Holder | None:
        row = self._volume_row(spec)
        return Holder(host=self.host_id) if row is not None and row["lv_active"] == "active" else None

    def cleanup_orphans(self) -> list[str]:
        return []  # no locks or helper processes: reconcile deactivates active LVs no mount explains

    def break_lock(self, spec: VolumeSpec) -> Holder:
        raise InvalidRequest(f"volume {spec.name} is an LVM volume on this host only: there is no lock to break")

    # --- facts --------------------------------------------------------------------------------------

    def status_facts(self, spec: VolumeSpec) -> dict:
        """For Docker's Get: allocation of the volume and of its pool, snapshots, a warning when full."""
        vg, pool = self._where(spec)
        rows = self._rows(vg)
        row = self._volume_row(spec, rows)
        if row is None:
            return {"error": f"logical volume {vg}/{spec.name} is missing"}
        usage = self.pool_usage(vg, pool, rows)
        facts = {"vg": vg, "thin_pool": pool, "lv_size": number(row["lv_size"]),
                 "allocated_percent": percent(row["data_percent"]), "active": row["lv_active"] == "active",
                 "pool_data_percent": usage["data_percent"], "pool_metadata_percent": usage["metadata_percent"],
                 "pool_overcommit": usage["overcommit"],
                 "snapshots": [r["lv_name"][len(spec.name) + 1:] for r in self._snapshot_rows(spec, rows)]}
        if row["origin"]:
            facts["origin"] = row["origin"].replace(SEP, "@", 1)
        if "warning" in usage:
            facts["warning"] = usage["warning"]
        return facts

    def info(self, spec: VolumeSpec) -> dict:
        return self.status_facts(spec)

    # --- resize and snapshots -----------------------------------------------------------------------

    def resize(self, spec: VolumeSpec, size_bytes: int) -> None:
        vg, pool = self._where(spec)
        with self._pool_lock(vg, pool):
            rows = self._rows(vg)
            row = self._volume_row(spec, rows)
            if row is None:
                raise NotFound(f"volume {spec.name}: logical volume {vg}/{spec.name} does not exist")
            have = number(row["lv_size"])
            if size_bytes < have:
                raise InvalidRequest(f"volume {spec.name}: shrinking ({have} -> {size_bytes} bytes) is not supported")
            if size_bytes > have:
                self._guard(vg, pool, rows, f"growing volume {spec.name}", extra=size_bytes - have)
                self._extend(vg, spec.name, size_bytes)

    def snapshot_create(self, spec: VolumeSpec, snap: str) -> None:
        vg, pool = self._where(spec)
        lv = spec.name + SEP + snap
        if len(lv) > LV_NAME_MAX:
            raise InvalidRequest(f"snapshot {spec.name}@{snap}: volume and snapshot names together may have "
                                 f"at most {LV_NAME_MAX - 1} characters on LVM")
        with self._pool_lock(vg, pool):
            rows = self._rows(vg)
            if self._volume_row(spec, rows) is None:
                raise NotFound(f"volume {spec.name}: logical volume {vg}/{spec.name} does not exist")
            if self._find(rows, lv) is not None:
                raise Conflict(f"snapshot {spec.name}@{snap} already exists")
            self._guard(vg, pool, rows, f"snapshot {spec.name}@{snap}")
            # Thin snapshots get the activation-skip flag by default: never activated by accident.
            self.lvm("lvcreate", "-s", f"{vg}/{spec.name}", "-n", lv, "--addtag", TAG, "--addtag", SNAPSHOT_TAG,
                     "-y", what=f"snapshotting volume {spec.name} ({snap})")

    def snapshot_list(self, spec: VolumeSpec) -> list[dict]:
        vg, _ = self._where(spec)
        return [{"name": r["lv_name"][len(spec.name) + 1:], "size": number(r["lv_size"]),
                 "created": _rfc3339(r["lv_time"])} for r in self._snapshot_rows(spec, self._rows(vg))]

    def snapshot_remove(self, spec: VolumeSpec, snap: str) -> None:
        vg, _ = self._where(spec)
        row = self._find(self._rows(vg), spec.name + SEP + snap)
        if row is None or not self._is_snapshot(row):
            log.warning("snapshot %s@%s does not exist; nothing to remove", spec.name, snap)
            return
        self._lvremove(vg, row["lv_name"])

    def snapshot_rollback(self, spec: VolumeSpec, snap: str) -> None:
        """The volume's LV becomes a new thin snapshot of ``snap`` (the snapshot stays); refused while
        the volume is active here (the driver refuses first while it is mounted)."""
        vg, _ = self._where(spec)
        rows = self._rows(vg)
        row = self._volume_row(spec, rows)
        if row is None:
            raise NotFound(f"volume {spec.name}: logical volume {vg}/{spec.name} does not exist")
        source = self._find(rows, spec.name + SEP + snap)
        if source is None or not self._is_snapshot(source):
            raise NotFound(f"snapshot {spec.name}@{snap} does not exist")
        if row["lv_active"] == "active":
            raise Conflict(f"volume {spec.name} is active on this host: stop its containers before a rollback")
        staging = spec.name + ROLLBACK_SUFFIX
        self._lvremove(vg, staging)  # a leftover of a rollback that failed before removing the volume
        self.lvm("lvcreate", "-s", f"{vg}/{source['lv_name']}", "-n", staging, "--addtag", TAG,
                 "--setactivationskip", "y", "-y", what=f"rolling volume {spec.name} back to {snap}")
        try:
            self.lvm("lvremove", "-y", f"{vg}/{spec.name}", what=f"replacing volume {spec.name}")
        except BackendError:
            self._lvremove(vg, staging)
            raise
        self._finish_rollback(vg, spec.name)
        if number(row["lv_size"]) > number(source["lv_size"]):  # grown after the snapshot: keep its size
            self._extend(vg, spec.name, number(row["lv_size"]))
        log.info("volume %s rolled back to %s", spec.name, snap)

    def _finish_rollback(self, vg: str, name: str) -> None:
        """The last step of a rollback: the staged LV takes the volume's name. Done again by the next
        lookup if the plugin died between the remove and this rename."""
        self.lvm("lvrename", vg, name + ROLLBACK_SUFFIX, name, what=f"finishing the rollback of volume {name}")


def _rfc3339(lv_time: str) -> str:
    """LVM's "2026-12-07 15:00:19 +0000" as RFC 3339 UTC."""
    try:
        when = dt.datetime.strptime(lv_time, "%Y-%m-%d %H:%M:%S %z")
    except ValueError:
        return lv_time
    return when.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")

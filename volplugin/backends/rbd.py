"""The Ceph RBD backend: one RBD image per volume (image name = volume name), in the configured pool
or the volume's own ``pool``.

- Connection, timeouts and error mapping: rbd_cluster.py. Every call is bounded: a dead cluster
  gives an error after ``connect_timeout``/``op_timeout``, never a hang.
- One writer across hosts: rbd_locks.py (the design) and rbd_attach.py (attach/detach/break_lock).
- The volume catalog every host shares (base.Catalog): rbd_catalog.py.
- Block devices (krbd, rbd-nbd, rbd-fuse + loop): rbd_devices.py; this host's records: rbd_host.py.
- Images get a kernel-compatible feature set (layering, exclusive-lock by default); clones are
  format 2 (no protected snapshot needed); remove moves the image to the RBD trash for
  ``trash_retention`` seconds; snapshot rollback and remove are refused while anyone holds or has
  the image open (they claim the ownership record for the duration, so no attach can race them).
"""
from __future__ import annotations

import logging
import os
import re

from plugincore.errors import Conflict, InvalidRequest, NotFound
from plugincore.locks import LockDir

from . import rbd_devices, rbd_host as host, rbd_locks as locks
from .base import Backend, Catalog, VolumeSpec
from .rbd_attach import AttachMixin
from .rbd_catalog import CatalogMixin
from .rbd_cluster import Cluster, rados, rbd
from .rbd_host import LocalRecords

log = logging.getLogger("volplugin.rbd")
FEATURES = {"layering": "RBD_FEATURE_LAYERING", "exclusive-lock": "RBD_FEATURE_EXCLUSIVE_LOCK",
            "object-map": "RBD_FEATURE_OBJECT_MAP", "fast-diff": "RBD_FEATURE_FAST_DIFF",
            "deep-flatten": "RBD_FEATURE_DEEP_FLATTEN", "striping": "RBD_FEATURE_STRIPINGV2",
            "journaling": "RBD_FEATURE_JOURNALING"}
SNAP_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
USER_SNAPSHOT = 0  # rbd snapshot namespace: user (not trash, group, mirror)


class RbdBackend(AttachMixin, CatalogMixin, Backend, Catalog):
    name = "rbd"

    def __init__(self, *, conf_path: str, pool: str = "rbd", client_name: str = "client.admin",
                 keyring: str | None = None, host_id: str, state_dir: str, connect_timeout: float = 10,
                 op_timeout: float = 30, attach_methods: tuple = ("krbd", "nbd", "fuse"),
                 fence_grace: float = 30.0, trash_retention: float = 86400,
                 image_features: tuple = ("layering", "exclusive-lock"), fence_expire: float = 7 * 86400):
        if not host_id:
            raise ValueError("host_id is required")
        unknown = [f for f in image_features if f not in FEATURES]
        if unknown or "layering" not in image_features:
            raise ValueError(f"image_features must include layering and be among {', '.join(FEATURES)}")
        self.pool, self.host_id = pool, host_id
        self.connect_timeout, self.op_timeout = connect_timeout, op_timeout
        self.attach_methods = tuple(attach_methods)
        self.fence_grace, self.trash_retention = fence_grace, trash_retention
        self.claim_ttl = max(60.0, connect_timeout + 3 * op_timeout)
        self.cluster = Cluster(conf_path=conf_path, client_name=client_name, keyring=keyring,
                               connect_timeout=connect_timeout, op_timeout=op_timeout)
        self.feature_bits = 0
        for feature in image_features:
            self.feature_bits |= getattr(rbd, FEATURES[feature])
        self.image_features = tuple(image_features)
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        self.state_dir = state_dir
        self.methods = rbd_devices.make_methods(self.attach_methods, self.cluster, state_dir)
        self.records = LocalRecords(state_dir)
        self.locks = LockDir(os.path.join(state_dir, "locks"))
        self.fencer = locks.Fencer(self.cluster, fence_expire)

    def _where(self, spec: VolumeSpec) -> tuple[str, str]:
        data = spec.backend_data or {}
        return data.get("pool") or self.pool, data.get("image") or spec.name

    def _call(self, spec: VolumeSpec, what: str, fn, timeout: float | None = None):
        pool, name = self._where(spec)
        return self.cluster.call(f"{what} volume {spec.name} (image {pool}/{name})", fn, pool=pool,
                                 timeout=timeout)

    # --- create / remove / exists -----------------------------------------------------------------

    def create(self, spec: VolumeSpec, clone_from: tuple[str, str] | None = None) -> dict:
        pool, name = self._where(spec)
        if clone_from is None and spec.size <= 0:
            raise InvalidRequest(f"volume {spec.name}: size must be a positive number of bytes")

        def create(ioctx):
            source_size = self._source_size(ioctx, pool, clone_from) if clone_from else 0
            size = max(spec.size, source_size)
            if clone_from and 0 < spec.size < source_size:
                raise InvalidRequest(f"volume {spec.name}: a clone cannot be smaller than its source "
                                     f"{clone_from[0]}@{clone_from[1]} ({source_size} bytes)")
            if self._check_existing(ioctx, spec, name, size, clone_from):
                return
            try:
                if clone_from:
                    rbd.RBD().clone(ioctx, clone_from[0], clone_from[1], ioctx, name, features=self.feature_bits)
                    try:
                        self._finish_clone(ioctx, name, size)
                    except BaseException:
                        host.quietly(rbd.RBD().remove, ioctx, name)  # no half-made clone left behind
                        raise
                else:
                    rbd.RBD().create(ioctx, name, size, old_format=False, features=self.feature_bits)
            except rbd.ImageExists:  # created concurrently (another host's Create of the same volume)
                if not self._check_existing(ioctx, spec, name, size, clone_from):
                    raise
            log.info("created image %s/%s (%d bytes%s)", pool, name, size,
                     f", clone of {clone_from[0]}@{clone_from[1]}" if clone_from else "")
        self._call(spec, "creating", create)
        return {"pool": pool, "image": name}

    @staticmethod
    def _source_size(ioctx, pool: str, clone_from: tuple[str, str]) -> int:
        source, snap = clone_from
        try:
            with rbd.Image(ioctx, source, snapshot=snap, read_only=True) as image:
                return image.size()
        except rbd.ImageNotFound:
            raise NotFound(f"snapshot {source}@{snap} does not exist (pool {pool})") from None

    def _check_existing(self, ioctx, spec: VolumeSpec, name: str, size: int, clone_from) -> bool:
        """True if the image exists exactly as asked (idempotent create); Conflict if it differs."""
        try:
            image = rbd.Image(ioctx, name, read_only=True)
        except rbd.ImageNotFound:
            return False
        with image:
            have = image.size()
            try:
                parent = image.get_parent_image_spec()
                parent = (parent["image_name"], parent["snap_name"])
            except rbd.ImageNotFound:
                parent = None
        if have != size:
            raise Conflict(f"volume {spec.name} already exists with a different size ({have} bytes, asked {size})")
        if clone_from is not None and parent != tuple(clone_from):
            raise Conflict(f"volume {spec.name} already exists and is not a clone of {clone_from[0]}@{clone_from[1]}")
        return True

    @staticmethod
    def _finish_clone(ioctx, name: str, size: int) -> None:
        with rbd.Image(ioctx, name) as image:
            # librbd copies the parent's image metadata into the clone: never inherit its holder
            oid = locks.header_oid(image)
            raw, _ = locks.read_record(ioctx, oid)
            if raw:
                locks.swap_record(ioctx, oid, raw, None)
            if image.size() < size:
                image.resize(size)

    def exists(self, spec: VolumeSpec) -> bool:
        def probe(ioctx):
            try:
                with rbd.Image(ioctx, self._where(spec)[1], read_only=True):
                    return True
            except rbd.ImageNotFound:
                return False
        try:
            return self._call(spec, "looking up", probe)
        except NotFound:  # the pool does not exist
            return False

    def remove(self, spec: VolumeSpec) -> None:
        def remove(ioctx):
            try:
                # the claim is dropped afterwards from the header, which lives on in the trash
                with self._maintenance(ioctx, spec, "remove"):
                    rbd.RBD().trash_move(ioctx, name, delay=int(self.trash_retention))
            except rbd.ImageNotFound:
                if name not in rbd.RBD().list(ioctx):
                    raise
                # listed but not openable: a create cut off half-way (no header yet). Nobody can have
                # it open; librbd's remove cleans such remains.
                rbd.RBD().remove(ioctx, name)
                log.warning("volume %s: removed the remains of a half-created image %s/%s", spec.name, pool, name)
        pool, name = self._where(spec)
        with self._local_lock(pool, name):
            try:
                self._call(spec, "removing", remove, timeout=3 * self.op_timeout + 5)
            except NotFound:
                log.warning("remove of volume %s: image %s/%s does not exist; nothing to do", spec.name, pool, name)
                return
        log.info("volume %s: image %s/%s moved to the trash for %gs", spec.name, pool, name, self.trash_retention)

    def _maintenance(self, ioctx, spec: VolumeSpec, op: str):
        return _Maintenance(self, ioctx, spec, op)

    # --- facts ------------------------------------------------------------------------------------

    def info(self, spec: VolumeSpec) -> dict:
        pool, name = self._where(spec)

        def info(ioctx):
            with rbd.Image(ioctx, name, read_only=True) as image:
                try:
                    parent = image.get_parent_image_spec()
                    parent = f"{parent['image_name']}@{parent['snap_name']}"
                except rbd.ImageNotFound:
                    parent = None
                _, record = locks.read_record(ioctx, locks.header_oid(image))
                watchers = locks.watcher_addresses(image)
                holder = None
                if record is not None:
                    alive = locks.Assessment(record, watchers, locks.lock_owners(image), self.claim_ttl).alive
                    holder = {"host": record.get("host"), "since": record.get("since"), "alive": alive}
                    if record.get("dead_since"):
                        holder["dead_since"] = record["dead_since"]
                return {"pool": pool, "image": name, "size": image.size(),
                        "features": rbd.RBD().features_to_string(image.features()).split(","),
                        "snapshots": self._snapshots(image), "parent": parent, "holder": holder,
                        "watchers": len(watchers),
                        "created": locks.rfc3339(image.create_timestamp().replace(tzinfo=locks.dt.timezone.utc))}
        return self._call(spec, "inspecting", info)

    # --- resize and snapshots ---------------------------------------------------------------------

    def resize(self, spec: VolumeSpec, size_bytes: int) -> None:
        """Grow the image (never shrink); a loop device attached here is told its new size. Refused
        while another host holds the volume (its device would not learn the size; grow it there)."""
        pool, name = self._where(spec)

        def resize(ioctx):
            with rbd.Image(ioctx, name) as image:
                _, record = locks.read_record(ioctx, locks.header_oid(image))
                if record is not None and record.get("host") != self.host_id:
                    raise Conflict(locks.in_use_message(spec.name, pool, record) + ": grow it on that host")
                have = image.size()
                if size_bytes < have:
                    raise InvalidRequest(f"volume {spec.name}: shrinking ({have} -> {size_bytes} bytes) "
                                         "is not supported")
                if size_bytes > have:
                    image.resize(size_bytes, allow_shrink=False)
        if size_bytes <= 0:
            raise InvalidRequest(f"volume {spec.name}: size must be a positive number of bytes")
        with self._local_lock(pool, name):
            self._call(spec, "resizing", resize)
            local = self.records.load(pool, name)
            if local is not None and local.get("method") in self.methods:
                self.methods[local["method"]].refresh_size(local, size_bytes)

    @staticmethod
    def _snapshots(image) -> list[dict]:
        return [{"name": s["name"], "size": s["size"],
                 "created": locks.rfc3339(image.get_snap_timestamp(s["id"]).replace(tzinfo=locks.dt.timezone.utc))}
                for s in image.list_snaps() if s.get("namespace", USER_SNAPSHOT) == USER_SNAPSHOT]

    def snapshot_create(self, spec: VolumeSpec, snap: str) -> None:
        """A crash-consistent snapshot (the driver freezes a mounted filesystem around this call)."""
        _check_snap_name(snap)

        def create(ioctx):
            with rbd.Image(ioctx, self._where(spec)[1]) as image:
                if any(s["name"] == snap for s in self._snapshots(image)):
                    raise Conflict(f"snapshot {spec.name}@{snap} already exists")
                image.create_snap(snap)
        self._call(spec, f"snapshotting ({snap})", create)

    def snapshot_list(self, spec: VolumeSpec) -> list[dict]:
        def listing(ioctx):
            with rbd.Image(ioctx, self._where(spec)[1], read_only=True) as image:
                return self._snapshots(image)
        return self._call(spec, "listing snapshots of", listing)

    def snapshot_remove(self, spec: VolumeSpec, snap: str) -> None:
        """Remove a snapshot (unknown = success). One that clones depend on moves to the snapshot trash
        and disappears with its last clone."""
        def remove(ioctx):
            with rbd.Image(ioctx, self._where(spec)[1]) as image:
                if not any(s["name"] == snap for s in self._snapshots(image)):
                    log.warning("snapshot %s@%s does not exist; nothing to remove", spec.name, snap)
                    return
                if image.is_protected_snap(snap):
                    image.unprotect_snap(snap)  # a format-1 clone parent: refused while children exist
                image.remove_snap(snap)
        self._call(spec, f"removing snapshot {snap} of", remove)

    def snapshot_rollback(self, spec: VolumeSpec, snap: str) -> None:
        """Roll the image back to ``snap``: refused while any host holds or has the image open."""
        def rollback(ioctx):
            with self._maintenance(ioctx, spec, "rollback"):
                with rbd.Image(ioctx, self._where(spec)[1]) as image:
                    if not any(s["name"] == snap for s in self._snapshots(image)):
                        raise NotFound(f"snapshot {spec.name}@{snap} does not exist")
                    image.rollback_to_snap(snap)
        pool, name = self._where(spec)
        with self._local_lock(pool, name):
            self._call(spec, f"rolling back to {snap}", rollback, timeout=3 * self.op_timeout + 5)


def _check_snap_name(snap: str) -> None:
    if not isinstance(snap, str) or not SNAP_NAME.match(snap):
        raise InvalidRequest(f"bad snapshot name {snap!r}: 1-100 of A-Z a-z 0-9 _ . - (not starting with _ . -)")


class _Maintenance:
    """Hold the ownership record for a maintenance operation (remove, rollback): refused while any
    host holds the volume or any client has the image open; released on exit."""

    def __init__(self, backend: RbdBackend, ioctx, spec: VolumeSpec, op: str):
        self.backend, self.ioctx, self.spec, self.op = backend, ioctx, spec, op
        self.oid = self.raw = None
        self.owners = []

    def _watchers(self, pool: str, name: str) -> set[str]:
        with rbd.Image(self.ioctx, name, read_only=True) as image:
            self.oid = locks.header_oid(image)
            self.owners = locks.lock_owners(image)
            return locks.watcher_addresses(image)

    def __enter__(self) -> str:
        """Called with the image's local lock held: no attach of it runs on this host meanwhile."""
        pool, name = self.backend._where(self.spec)
        watchers = self._watchers(pool, name)
        raw, record = locks.read_record(self.ioctx, self.oid)
        if record is not None and not self._own_leftover(record, watchers, pool, name):
            message = locks.in_use_message(self.spec.name, pool, record) + f": cannot {self.op} it"
            if not locks.Assessment(record, watchers, self.owners, self.backend.claim_ttl).alive:
                message += " (that host's clients are gone: break its lock first)"
            raise Conflict(message)
        if watchers:
            raise Conflict(f"volume {self.spec.name}: image {pool}/{name} is open by clients "
                           f"{', '.join(sorted(watchers))}: cannot {self.op} it")
        # An intent record first: if this process dies holding the claim, start-up cleanup releases it.
        self.backend.records.save({"volume": self.spec.name, "pool": pool, "image": name, "broken": self.op})
        claim = locks.new_record(self.backend.host_id, op=self.op)
        if not locks.swap_record(self.ioctx, self.oid, raw if record is not None else "", claim):
            self.backend.records.drop(pool, name)
            locks.refuse_if_changed(False, self.spec.name)
        self.raw = locks.encode(claim)
        if self._watchers(pool, name):  # opened between our look and our claim
            self.__exit__(None, None, None)
            raise Conflict(f"volume {self.spec.name} was opened by another client just now: cannot {self.op} it")
        return self.oid

    def _own_leftover(self, record: dict, watchers: set[str], pool: str, name: str) -> bool:
        """This host's own claim that nothing here uses any more (a plugin killed in the middle of an
        attach, remove or rollback): no client has the image open and no device is recorded here
        (at most the intent record of that interrupted operation)."""
        local = self.backend.records.load(pool, name)
        return record.get("host") == self.backend.host_id and not watchers and not (local or {}).get("device")

    def __exit__(self, *exc) -> None:
        pool, name = self.backend._where(self.spec)
        try:
            locks.swap_record(self.ioctx, self.oid, self.raw, None)
        except (rbd.ImageNotFound, rados.ObjectNotFound):
            pass  # removed for good
        self.backend.records.drop(pool, name)
        return None

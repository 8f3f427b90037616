"""Attach/detach of RBD volumes with one writer across hosts (the RbdBackend methods that deal with
ownership; the record, liveness and fencing rules are in rbd_locks.py, the device methods in
rbd_devices.py, this host's records in rbd_host.py).

attach: (1) a healthy local attachment still owned by this host is returned as is; half-dead local
pieces are torn down; (2) the ownership record is claimed (compare-and-swap), fencing a dead holder
once its grace has passed; (3) the device is exposed; (4) the new watchers (our writer's client
addresses) are written into the record; (5) the local record is saved. Any failure undoes the
completed steps in reverse. detach tears down this host's pieces, then releases the record only if
this host holds it (fencing our own writer first if it died without closing its watch).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time

from plugincore.errors import BackendError, Conflict, NotFound, PluginError

from . import rbd_devices, rbd_host as host, rbd_locks as locks
from ..metrics import lock_takeover
from .base import Holder, VolumeSpec
from .rbd_cluster import rbd

log = logging.getLogger("volplugin.rbd")


class AttachMixin:
    # --- helpers ----------------------------------------------------------------------------------

    def _local_lock(self, pool: str, image: str):
        digest = hashlib.sha1(f"{pool}/{image}".encode()).hexdigest()[:24]
        return self.locks.hold("rbd-" + digest, timeout=3 * self.op_timeout + self.connect_timeout)

    def _on_image(self, spec: VolumeSpec, what: str, fn, *, timeout: float | None = None):
        """Run ``fn(ioctx, image, oid)`` with the image opened read-only (no watch, no lock)."""
        pool, name = self._where(spec)

        def body(ioctx):
            with rbd.Image(ioctx, name, read_only=True) as image:
                return fn(ioctx, image, locks.header_oid(image))
        return self.cluster.call(f"{what} volume {spec.name} (image {pool}/{name})", body, pool=pool,
                                 timeout=timeout)

    def _fence_own(self, ioctx, image, record: dict, watchers: set[str], name: str) -> None:
        """Our own recorded clients that still watch after we tore our attachment down are dead or
        hung: fence them so their watch and lock go now, not after the watch timeout."""
        stale = [a for a in record.get("addresses") or [] if a in watchers]
        stale += [addr for _, _, addr in locks.lock_owners(image)
                  if addr in (record.get("addresses") or []) and addr not in stale]
        if stale:
            self.fencer.fence(name, stale)
            locks.Fencer.break_stale_lock(image, name, stale)

    # --- attach -----------------------------------------------------------------------------------

    def attach(self, spec: VolumeSpec) -> str:
        pool, name = self._where(spec)
        with self._local_lock(pool, name):
            local = self.records.load(pool, name)
            if local is not None:
                method = self.methods.get(local.get("method"))
                if method is not None and not local.get("broken") and method.healthy(local):
                    self._confirm_ownership(spec, local)
                    return local["device"]
                log.warning("volume %s: local attachment %s is half-dead; tearing it down",
                            spec.name, local.get("device"))
                self._teardown(local)
            leftovers = self._leftovers(pool, name)
            if leftovers:
                # A refused attach must change nothing here: a mapping of an image that another
                # live host holds is not ours to tear down (an admin's `rbd map`; in the VM lane's
                # tests, the other "host" sharing this kernel).
                self._refuse_if_held_elsewhere(spec)
            self._teardown_leftovers(pool, name, leftovers)
            with contextlib.ExitStack() as undo:
                # An intent record first: if this process dies between claiming and recording the
                # attachment, start-up cleanup finds it and releases the claim (nothing else knows it).
                self.records.save({"volume": spec.name, "pool": pool, "image": name, "broken": "attaching"})
                undo.callback(self.records.drop, pool, name)
                claim = self._claim(spec)
                undo.callback(host.quietly, self._release, spec)
                started = time.monotonic()
                facts = rbd_devices.expose(self.methods, self.attach_methods, pool, name, undo)
                addresses = self._writer_addresses(spec, set())
                record = dict(json.loads(claim), method=facts["method"], addresses=addresses)
                self._on_image(spec, "recording the holder of", lambda io, _, oid: locks.refuse_if_changed(
                    locks.swap_record(io, oid, claim, record), spec.name))
                local = {"volume": spec.name, "pool": pool, "image": name, "since": record["since"],
                         "addresses": addresses, **facts}
                self.records.save(local)
                undo.pop_all()
        log.info("volume %s attached as %s via %s in %.2fs (clients %s)", spec.name, local["device"],
                 local["method"], time.monotonic() - started, ", ".join(addresses))
        return local["device"]

    def _confirm_ownership(self, spec: VolumeSpec, local: dict) -> None:
        """A healthy local attachment is only usable while the cluster still says it is ours."""
        def check(ioctx, image, oid):
            raw, record = locks.read_record(ioctx, oid)
            if record is not None and record.get("host") == self.host_id:
                return
            watchers = locks.watcher_addresses(image)
            if record is None and set(local.get("addresses") or []) & watchers:
                mine = dict(locks.new_record(self.host_id, local["method"]), addresses=local["addresses"],
                            since=local.get("since", ""))
                if locks.swap_record(ioctx, oid, "", mine):
                    log.warning("volume %s: ownership record was missing; recorded it again", spec.name)
                    return
            holder = f"host {record['host']} since {record.get('since')}" if record else "nobody"
            raise Conflict(f"volume {spec.name} is attached on this host as {local['device']}, but the "
                           f"cluster now records {holder} as its holder: this host was fenced; "
                           "unmount and detach it here")
        self._on_image(spec, "checking the holder of", check)

    def _refuse_if_held_elsewhere(self, spec: VolumeSpec) -> None:
        """Conflict (read only) while another host holds the volume and its clients are alive."""
        pool, _ = self._where(spec)

        def check(ioctx, image, oid):
            _, record = locks.read_record(ioctx, oid)
            if record is not None and record.get("host") != self.host_id and locks.Assessment(
                    record, locks.watcher_addresses(image), locks.lock_owners(image), self.claim_ttl).alive:
                raise Conflict(locks.in_use_message(spec.name, pool, record))
        self._on_image(spec, "checking the holder of", check)

    def _claim(self, spec: VolumeSpec) -> str:
        """Make this host the recorded holder (taking over a dead holder after its grace); return the
        raw record written."""
        pool, _ = self._where(spec)

        def claim(ioctx, image, oid):
            for _ in range(3):
                raw, record = locks.read_record(ioctx, oid)
                watchers = locks.watcher_addresses(image)
                mine = locks.new_record(self.host_id)
                if record is None:
                    if watchers:
                        raise Conflict(f"volume {spec.name}: image {pool}/{image.get_name()} is open by "
                                       f"clients not managed by volplugin: {', '.join(sorted(watchers))}")
                elif record.get("host") == self.host_id:
                    self._fence_own(ioctx, image, record, watchers, spec.name)
                    others = watchers - set(record.get("addresses") or [])
                    if others:
                        raise Conflict(f"volume {spec.name} is recorded as held by this host id "
                                       f"({self.host_id}) but clients {', '.join(sorted(others))} that this "
                                       "host does not know have it open (is the host id unique?)")
                else:
                    raw = self._take_over(ioctx, image, oid, raw, record, watchers, spec.name, pool)
                if locks.swap_record(ioctx, oid, raw, mine):
                    return locks.encode(mine)
            raise Conflict(f"volume {spec.name}: its ownership keeps changing; try again")
        return self._on_image(spec, "claiming", claim, timeout=3 * self.op_timeout + 5)

    def _take_over(self, ioctx, image, oid, raw, record, watchers, name: str, pool: str) -> str:
        """Fence a dead holder once its grace has passed; return the raw record to swap for ours."""
        assessment = locks.Assessment(record, watchers, locks.lock_owners(image), self.claim_ttl)
        locks.check_dead(name, pool, assessment)
        if not record.get("dead_since"):
            record = locks.mark_dead(ioctx, oid, raw, record, self.host_id, name)
            raw = locks.encode(record)
            log.warning("volume %s: holder %s is dead; fencing allowed after %gs", name, record["host"],
                        self.fence_grace)
        locks.refuse_during_grace(name, record, self.fence_grace)
        log.warning("volume %s: taking over from dead host %s (since %s)", name, record["host"], record["since"])
        self.fencer.fence(name, assessment.fence)
        locks.Fencer.break_stale_lock(image, name, assessment.fence)
        lock_takeover()
        return raw

    def _writer_addresses(self, spec: VolumeSpec, known: set[str]) -> list[str]:
        """The client addresses our new writer watches the image with (they appear at once for krbd
        and nbd, when the loop device opens the file for rbd-fuse)."""
        deadline = time.monotonic() + self.connect_timeout + 5
        while True:
            watchers = self._on_image(spec, "finding the writer of", lambda _io, image, _oid:
                                      locks.watcher_addresses(image))
            new = sorted(watchers - known)
            if new:
                return new
            if time.monotonic() > deadline:
                raise BackendError(f"volume {spec.name}: the attached device's client never showed up "
                                   "as a watcher of the image")
            time.sleep(0.05)

    # --- detach -----------------------------------------------------------------------------------

    def detach(self, spec: VolumeSpec) -> None:
        pool, name = self._where(spec)
        with self._local_lock(pool, name):
            local = self.records.load(pool, name)
            if local is not None:
                self._teardown(local)
            self._teardown_leftovers(pool, name)
            try:
                self._release(spec)
            except NotFound:
                pass
            except PluginError as exc:  # the holder record stays: another host fences us after the grace
                log.error("volume %s detached here but its ownership record could not be released: %s",
                          spec.name, exc)

    def _teardown(self, local: dict) -> None:
        method = self.methods.get(local.get("method"))
        if method is None or local.get("broken"):
            self._teardown_leftovers(local["pool"], local["image"])
        else:
            method.detach(local)
        self.records.drop(local["pool"], local["image"])

    def _leftovers(self, pool: str, name: str) -> list[tuple]:
        """(method, leftover) of every attachment of the image on this host, recorded or not."""
        return [(method, leftover) for method in self.methods.values() if method.usable()
                for leftover in method.leftovers(pool, name)]

    def _teardown_leftovers(self, pool: str, name: str, found: list[tuple] | None = None) -> None:
        for method, leftover in self._leftovers(pool, name) if found is None else found:
            log.warning("tearing down leftover %s attachment of %s/%s", method.name, pool, name)
            method.detach(leftover)

    def _release(self, spec: VolumeSpec) -> None:
        def release(ioctx, image, oid):
            raw, record = locks.read_record(ioctx, oid)
            if record is None or record.get("host") != self.host_id:
                return
            self._fence_own(ioctx, image, record, locks.watcher_addresses(image), spec.name)
            if not locks.ensure_record_cleared(ioctx, oid, self.host_id):
                log.warning("volume %s: ownership moved to another host while releasing", spec.name)
        self._on_image(spec, "releasing", release)

    # --- reconciliation ---------------------------------------------------------------------------

    def attached(self) -> dict[str, str]:
        found = {}
        for local in self.records.all():
            method = self.methods.get(local.get("method"))
            if method is not None and not local.get("broken") and method.healthy(local):
                found[local["volume"]] = local["device"]
        return found

    def cleanup_orphans(self) -> list[str]:
        """Tear down recorded attachments that are half-dead (process, mount or device gone), FUSE
        leftovers nobody recorded and unrecorded kernel mappings of volumes this host holds; release
        their ownership. Skips a device a filesystem still sits on (the driver unmounts first).
        Returns the volumes cleaned up."""
        cleaned = []
        recorded = set()
        for local in self.records.all():
            recorded.add((local["pool"], local["image"]))
            method = self.methods.get(local.get("method"))
            if method is not None and not local.get("broken") and method.healthy(local):
                continue
            if local.get("device") and host.device_in_use(local["device"]):
                log.warning("volume %s: half-dead device %s is still mounted; not cleaning it up",
                            local["volume"], local["device"])
                continue
            spec = VolumeSpec(name=local["volume"], size=0,
                              backend_data={"pool": local["pool"], "image": local["image"]})
            host.quietly(self.detach, spec)
            cleaned.append(local["volume"])
        for pool, name in self.methods["fuse"].directories():
            if (pool, name) not in recorded and self.methods["fuse"].leftovers(pool, name):
                host.quietly(self.methods["fuse"].detach, {"pool": pool, "image": name})
                cleaned.append(name)
        return cleaned + self._cleanup_unrecorded_mappings(recorded)

    def _cleanup_unrecorded_mappings(self, recorded: set) -> list[str]:
        """Kernel mappings (krbd, nbd) that no local record explains, of images whose ownership record
        names this host: the plugin died between mapping and recording, or lost its state directory.
        Torn down and released unless mounted. Other mappings here (an admin's `rbd map`, images
        held by nobody or by another host) are not ours: left alone."""
        cleaned = []
        for method in self.methods.values():
            if not isinstance(method, rbd_devices.KernelMapping) or not method.usable():
                continue
            for pool, name, device in method.mapped():
                if (pool, name) in recorded or host.device_in_use(device):
                    continue
                spec = VolumeSpec(name=name, size=0, backend_data={"pool": pool, "image": name})
                try:
                    with self._local_lock(pool, name):  # an attach in progress records it under this lock
                        holder = self.holder(spec)
                        if self.records.load(pool, name) is not None or holder is None \
                                or holder.host != self.host_id:
                            continue
                        log.warning("volume %s: %s device %s is recorded nowhere on this host, but the "
                                    "cluster names this host its holder: tearing it down", name,
                                    method.name, device)
                        self._teardown_leftovers(pool, name)
                        self._release(spec)
                except PluginError as exc:
                    log.error("volume %s: cleaning up unrecorded device %s failed: %s", name, device, exc)
                    continue
                cleaned.append(name)
        return cleaned

    # --- ownership queries and the admin break ----------------------------------------------------

    def holder(self, spec: VolumeSpec) -> Holder | None:
        def query(ioctx, image, oid):
            _, record = locks.read_record(ioctx, oid)
            watchers = locks.watcher_addresses(image)
            if record is not None:
                return locks.Assessment(record, watchers, locks.lock_owners(image), self.claim_ttl).holder()
            if watchers:
                return Holder(host="unknown (a client not managed by volplugin)", alive=True,
                              addresses=sorted(watchers))
            return None
        try:
            return self._on_image(spec, "looking up the holder of", query)
        except NotFound:
            return None

    def break_lock(self, spec: VolumeSpec) -> Holder:
        """Admin command: fence the holder's clients (alive or not) and drop its ownership record."""
        def breaking(ioctx, image, oid):
            raw, record = locks.read_record(ioctx, oid)
            owners = locks.lock_owners(image)
            if record is None and not owners:
                raise NotFound(f"volume {spec.name} is not held by any host")
            if record is not None and record.get("host") == self.host_id:
                raise Conflict(f"volume {spec.name} is held by this host ({self.host_id}): detach it instead")
            record = record or {"host": "unknown (no volplugin record)", "since": "", "addresses": []}
            watchers = locks.watcher_addresses(image)
            assessment = locks.Assessment(record, watchers, owners, self.claim_ttl)
            targets = sorted(set(record.get("addresses") or []) | {addr for _, _, addr in owners})
            self.fencer.fence(spec.name, targets)
            locks.Fencer.break_stale_lock(image, spec.name, targets)
            if raw:
                locks.refuse_if_changed(locks.swap_record(ioctx, oid, raw, None), spec.name)
            log.warning("volume %s: lock of host %s broken by %s", spec.name, record["host"], self.host_id)
            return Holder(host=record["host"], since=record.get("since", ""), alive=assessment.alive,
                          addresses=targets)
        return self._on_image(spec, "breaking the lock of", breaking, timeout=3 * self.op_timeout + 5)

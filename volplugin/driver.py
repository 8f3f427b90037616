"""Volume lifecycle behind the Docker volume protocol, the same for every backend.

Per-volume cross-process locks (refusing after a timeout, never deadlocking); the first Mount on this
host attaches and mounts, the last Unmount of a known caller unmounts and detaches; every multi-step
operation is rolled back on failure; releasing what is unknown succeeds.
"""
import contextlib
import logging
import os

from plugincore.errors import Conflict, InvalidRequest, NotFound, PluginError
from . import filesystem, metrics
from .backends.base import LocalOnlyCatalog, VolumeSpec
from .options import check_name, parse_from, parse_volume_options
from .state import CREATING, READY, VolumeState, rfc3339

log = logging.getLogger("volplugin.driver")
_NO_CATALOG = LocalOnlyCatalog()


class VolumeDriver:
    def __init__(self, state: VolumeState, locks, backends: dict, *, host_id: str, mount_root: str,
                 defaults: dict, catalog):
        self.state = state
        self.locks = locks
        self.backends = backends
        self.host_id = host_id
        self.mount_root = mount_root
        self.defaults = defaults
        self.catalog = catalog

    def _lock(self, name: str):
        return self.locks.hold("vol-" + name, timeout=100)

    def _backend(self, options: dict):
        try:
            return self.backends[options["backend"]]
        except KeyError:
            raise InvalidRequest(f"backend {options['backend']!r} is not available "
                                 f"(configured: {', '.join(sorted(self.backends))})") from None

    def _spec(self, name: str, volume: dict) -> VolumeSpec:
        return VolumeSpec(name=name, size=volume["options"]["size"], backend_data=volume["backend_data"])

    def _host_local(self, volume: dict) -> bool:
        backend = self.backends.get(volume["options"]["backend"])
        return backend is not None and backend.host_local

    def _catalog(self, options: dict):
        """Where a volume's record is shared: the shared catalog, unless its backend is host-local."""
        return _NO_CATALOG if self.backends[options["backend"]].host_local else self.catalog

    @property
    def scope(self) -> str:
        # Docker's volume scope is per driver: "global" as soon as volumes can be seen from every host.
        return "global" if self.catalog.shared else "local"

    def _find(self, name: str) -> dict | None:
        """A volume, from the shared catalog (the truth: another host may have created or removed it),
        or from local state alone for a host-local volume, a host-local catalog or a volume attached here."""
        volume = self.state.volume(name)
        local = volume if volume is not None and volume["status"] == READY else None
        if local is not None and self._host_local(local):
            return local
        if not self.catalog.shared or (local is not None and self.state.attachment(name)):
            return local
        record = self.catalog.catalog_get(name)
        if record is None:
            if local is not None:
                self.state.drop_volume(name)  # removed on another host
            return None
        if local is None or local["options"] != record["options"]:
            self.state.put_volume(name, record["options"], record["backend_data"], READY, record["created_at"])
        return self.state.volume(name)

    # Create / Remove
    def create(self, name: str, opts: dict | None) -> None:
        check_name(name)
        options = parse_volume_options(opts, self.defaults)
        backend = self._backend(options)
        backend.validate_name(name)
        with self._lock(name):
            existing = self._find(name)
            if existing is not None:
                self._check_same(name, existing["options"], options, opts or {})
                return
            clone_from = parse_from(options["from"]) if "from" in options else None
            if clone_from:
                options = self._clone_options(options, opts or {}, clone_from)
                backend = self._backend(options)
            spec = VolumeSpec(name=name, size=options["size"],
                              backend_data={"pool": options["pool"]} if options["pool"] else {})
            self.state.put_volume(name, options, spec.backend_data, CREATING)
            with contextlib.ExitStack() as undo:
                undo.callback(self.state.drop_volume, name)
                spec.backend_data = backend.create(spec, clone_from)
                undo.callback(_quietly, backend.remove, spec)
                self._format(backend, spec, options, clone=clone_from is not None)
                record = {"options": options, "backend_data": spec.backend_data, "created_at": rfc3339()}
                self._catalog(options).catalog_put(name, record)
                self.state.put_volume(name, options, spec.backend_data, READY, record["created_at"])
                undo.pop_all()
        log.info("volume %s created (%s, %d bytes, %s)", name, options["backend"], options["size"], options["fs"])

    def _clone_options(self, options: dict, given: dict, clone_from: tuple[str, str]) -> dict:
        """A clone gets no new filesystem: it has its source's backend, pool, filesystem and PGDATA
        layout, so options the caller left out come from the source volume, not from the configured
        defaults (a default fs other than the source's made every Mount fail: `mount -t ext4` of an XFS
        clone). Its size, if not given: the default, or the snapshot's if that is bigger (both backends
        refuse a clone smaller than its source). Asking for a different backend or fs is refused."""
        source = self._find(clone_from[0])
        if source is None:
            raise NotFound(f"source volume {clone_from[0]} does not exist")
        origin = "@".join(clone_from)
        for key in ("backend", "fs"):
            if key in given and options[key] != source["options"][key]:
                raise InvalidRequest(f"{key} {options[key]}: a clone of {origin} has its source's "
                                     f"{key} ({source['options'][key]})")
        inherited = {k: source["options"][k] for k in ("backend", "pool", "fs", "pgdata", "uid", "gid")
                     if k not in given}
        options = {**options, **inherited}
        if "size" not in given:
            snaps = self._backend(options).snapshot_list(self._spec(clone_from[0], source))
            options["size"] = max([options["size"]] + [s["size"] for s in snaps if s["name"] == clone_from[1]])
        return options

    @staticmethod
    def _check_same(name: str, have: dict, want: dict, given: dict) -> None:
        # `-v name:/path` re-sends Create without options: only options the caller gave must match.
        differing = [k for k in given if k in want and want[k] != have.get(k)]
        if differing:
            raise Conflict(f"volume {name} already exists with different options: " + ", ".join(
                f"{k}={have.get(k)} (asked {want[k]})" for k in differing))

    def _format(self, backend, spec: VolumeSpec, options: dict, clone: bool = False) -> None:
        """A new volume: filesystem and PGDATA directory. A clone: its source's filesystem, grown to the
        clone's size (a clone asked bigger than its source must not keep the source's size inside)."""
        device = backend.attach(spec)
        scratch = os.path.join(self.mount_root, ".format", spec.name)
        try:
            if not clone:
                filesystem.ensure_filesystem(device, options["fs"])
            filesystem.mount(device, scratch, options["fs"])
            try:
                if clone:
                    filesystem.grow(device, scratch, options["fs"])
                else:
                    filesystem.prepare_pgdata(scratch, options["pgdata"], options["uid"], options["gid"])
            finally:
                filesystem.unmount(scratch)
                os.rmdir(scratch)
        finally:
            backend.detach(spec)

    def undo_unfinished_create(self, name: str) -> None:
        """A Create cut off by a crash leaves its row "creating" (and maybe an image). Docker got no
        answer, so the volume is not its: finished if its record reached the shared catalog (other
        hosts may use it already), removed otherwise. Call with the volume's lock held."""
        volume = self.state.volume(name)
        if volume is None or volume["status"] != CREATING:
            return
        record = self._catalog(volume["options"]).catalog_get(name)
        if record is not None:
            self.state.put_volume(name, record["options"], record["backend_data"], READY, record["created_at"])
            log.warning("volume %s: its creation was cut off after it was complete; kept", name)
            return
        log.warning("volume %s: its creation was cut off; removing what it made", name)
        self._backend(volume["options"]).remove(self._spec(name, volume))
        self.state.drop_volume(name)

    def remove(self, name: str) -> None:
        check_name(name)
        with self._lock(name):
            self.undo_unfinished_create(name)
            volume = self._find(name)
            if volume is None:
                log.warning("Remove of unknown volume %s: nothing to do", name)
                return
            self._release_stale_mount(name)
            self._backend(volume["options"]).remove(self._spec(name, volume))
            self._catalog(volume["options"]).catalog_delete(name)
            self.state.drop_volume(name)

    def release_stale_mounts(self, name: str, stale: frozenset, why: str) -> bool:
        """For the garbage collection (volplugin.docker_gc): drop the mount IDs of ``name`` and unmount it,
        if all its IDs are among ``stale`` (a Mount since then is a container starting). Conflict while a
        process in another mount namespace has the filesystem. True if something was released."""
        with self._lock(name):
            if self.state.volume(name) is None or not set(self.state.callers(name)) <= stale:
                return False
            return self._release_stale_mount(name, why)

    def _release_stale_mount(self, name: str, why: str = "Docker removes it") -> bool:
        """Docker sends Remove only for a volume no container of its own refers to, so mount IDs still
        recorded here are stale: a Mount whose reply a crash cut off (Docker never learnt the ID, so
        never unmounts it) or an Unmount that never came. They are dropped and the volume unmounted,
        unless a process in another mount namespace (a container) still has the filesystem."""
        callers, attached = self.state.callers(name), self.state.attachment(name)
        if not callers and not attached:
            return False
        users = filesystem.used_in_other_namespaces(attached["mountpoint"]) if attached else []
        if users:
            raise Conflict(f"volume {name} is mounted on this host by {len(callers)} container(s) and still "
                           f"in use (process {users[0]} has it mounted)")
        log.warning("volume %s: %s; dropping %d mount ID(s) Docker no longer holds (%s) and unmounting it",
                    name, why, len(callers), ", ".join(c[:12] for c in callers))
        self._unmount_and_detach(name)
        return True

    # Mount / Unmount
    def mount(self, name: str, caller: str) -> str:
        check_name(name)
        if not caller:
            raise InvalidRequest("ID is required")
        with self._lock(name):
            volume = self._find(name)
            if volume is None:
                raise NotFound(f"volume {name} does not exist")
            attached = self.state.attachment(name)
            if attached and filesystem.mount_source(attached["mountpoint"]) is not None:
                self.state.add_caller(name, caller)
                return attached["mountpoint"]
            return self._attach_and_mount(name, volume, caller)

    def _attach_and_mount(self, name: str, volume: dict, caller: str) -> str:
        backend, spec, options = self._backend(volume["options"]), self._spec(name, volume), volume["options"]
        mountpoint = os.path.join(self.mount_root, name)
        with metrics.attach_timer(options["backend"]), contextlib.ExitStack() as undo:
            device = backend.attach(spec)
            undo.callback(_quietly, backend.detach, spec)
            filesystem.mount(device, mountpoint, options["fs"])
            undo.callback(_quietly, filesystem.unmount, mountpoint)
            filesystem.prepare_pgdata(mountpoint, options["pgdata"], options["uid"], options["gid"])
            self.state.record_mount(name, caller, device, mountpoint)
            undo.pop_all()
        log.info("volume %s attached at %s and mounted on %s", name, device, mountpoint)
        return mountpoint

    def unmount(self, name: str, caller: str) -> None:
        check_name(name)
        with self._lock(name):
            known, left = self.state.remove_caller(name, caller)
            if not known:
                # A stale or foreign Unmount (e.g. a replaced task's, arriving after the new Mount).
                log.warning("Unmount of %s by unknown caller %s: nothing to do", name, caller[:12])
                return
            if left:
                return
            self._unmount_and_detach(name)

    def _unmount_and_detach(self, name: str) -> None:
        attached = self.state.attachment(name)
        volume = self.state.volume(name)
        with metrics.detach_timer(volume["options"]["backend"] if volume else "unknown"):
            if attached:
                filesystem.unmount(attached["mountpoint"])
                with contextlib.suppress(OSError):
                    os.rmdir(attached["mountpoint"])
            if volume is not None:
                self._backend(volume["options"]).detach(self._spec(name, volume))
        self.state.drop_attachment(name)
        log.info("volume %s unmounted and detached", name)

    # Queries (cheap: local state and the kernel; the catalog only for volumes never seen here)
    def path(self, name: str) -> str:
        check_name(name)
        attached = self.state.attachment(name)
        if attached and filesystem.mount_source(attached["mountpoint"]) is not None:
            return attached["mountpoint"]
        if self._find(name) is None:
            raise NotFound(f"volume {name} does not exist")
        return ""

    def get(self, name: str) -> dict:
        check_name(name)
        volume = self._find(name)
        if volume is None:
            raise NotFound(f"volume {name} does not exist")
        mountpoint = self.path(name)
        options = volume["options"]
        status = {"backend": options["backend"], "size": options["size"], "fs": options["fs"],
                  "pgdata": options["pgdata"], "uid": options["uid"], "gid": options["gid"],
                  **volume["backend_data"]}
        if options["backend"] in self.backends:
            try:
                status.update(self._backend(options).status_facts(self._spec(name, volume)))
            except PluginError as exc:  # Get must answer: Docker calls it around every operation
                status["error"] = str(exc)
        if mountpoint:
            status.update(used=filesystem.usage(mountpoint)["used"], attached_host=self.host_id,
                          containers=self.state.callers(name),
                          pg_version=filesystem.pg_version(mountpoint, options["pgdata"]))
        return {"Name": name, "Mountpoint": mountpoint, "CreatedAt": volume["created_at"], "Status": status}

    def list(self) -> list[dict]:
        mounted = {a["volume"]: a["mountpoint"] for a in self.state.attachments()}
        local = {v["name"] for v in self.state.volumes()
                 if v["status"] == READY and (not self.catalog.shared or self._host_local(v))}
        names = local | set(mounted)
        if self.catalog.shared:
            names |= set(self.catalog.catalog_list())
        return [{"Name": n, "Mountpoint": mounted.get(n, "")} for n in sorted(names)]


def _quietly(fn, *args) -> None:
    """An undo step: log failures instead of hiding the error that caused the rollback."""
    try:
        fn(*args)
    except Exception:  # noqa: BLE001
        log.exception("rollback step %s failed", getattr(fn, "__name__", fn))

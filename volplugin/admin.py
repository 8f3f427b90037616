"""Operations beyond Docker's protocol, for the `volplugin` admin CLI: snapshots, clones' sources,
online grow, breaking a dead host's lock. They take the same per-volume locks as the protocol."""
import contextlib
import logging

from plugincore.errors import Conflict, InvalidRequest, NotFound
from . import filesystem
from .options import check_name, check_snapshot, parse_size

log = logging.getLogger("volplugin.admin")


class Admin:
    def __init__(self, driver):
        self.driver = driver

    def _volume(self, name: str):
        check_name(name)
        volume = self.driver._find(name)
        if volume is None:
            raise NotFound(f"volume {name} does not exist")
        return volume, self.driver._backend(volume["options"]), self.driver._spec(name, volume)

    def snapshot_create(self, name: str, snap: str) -> None:
        check_snapshot(snap)
        with self.driver._lock(name):
            _, backend, spec = self._volume(name)
            attached = self.driver.state.attachment(name)
            with contextlib.ExitStack() as stack:
                if (attached and filesystem.mount_source(attached["mountpoint"])
                        and not backend.snapshot_freezes_filesystem):
                    # Crash-consistent: no write is half on disk while the snapshot is taken.
                    filesystem.freeze(attached["mountpoint"])
                    stack.callback(filesystem.thaw, attached["mountpoint"])
                backend.snapshot_create(spec, snap)
        log.info("snapshot %s@%s created", name, snap)

    def snapshot_list(self, name: str) -> list[dict]:
        _, backend, spec = self._volume(name)
        return backend.snapshot_list(spec)

    def snapshot_remove(self, name: str, snap: str) -> None:
        check_snapshot(snap)
        with self.driver._lock(name):
            _, backend, spec = self._volume(name)
            backend.snapshot_remove(spec, snap)

    def snapshot_rollback(self, name: str, snap: str) -> None:
        check_snapshot(snap)
        with self.driver._lock(name):
            _, backend, spec = self._volume(name)
            if self.driver.state.attachment(name):
                raise Conflict(f"volume {name} is mounted here: stop its containers before a rollback")
            backend.snapshot_rollback(spec, snap)

    def grow(self, name: str, size: str) -> int:
        new_size = parse_size(size)
        with self.driver._lock(name):
            volume, backend, spec = self._volume(name)
            if new_size < volume["options"]["size"]:
                raise InvalidRequest(f"volume {name} is {volume['options']['size']} bytes: shrinking is not "
                                     "supported")
            backend.resize(spec, new_size)
            attached = self.driver.state.attachment(name)
            if attached and filesystem.mount_source(attached["mountpoint"]):
                filesystem.grow(attached["device"], attached["mountpoint"], volume["options"]["fs"])
            options = dict(volume["options"], size=new_size)
            record = {"options": options, "backend_data": volume["backend_data"], "created_at": volume["created_at"]}
            self.driver._catalog(options).catalog_put(name, record)
            self.driver.state.put_volume(name, options, volume["backend_data"], volume["status"],
                                         volume["created_at"])
        return new_size

    def break_lock(self, name: str):
        with self.driver._lock(name):
            _, backend, spec = self._volume(name)
            return backend.break_lock(spec)

    def pools(self) -> list[dict]:
        """Fill levels of the LVM thin pools in use (the configured one and those volumes name)."""
        found = {}
        for backend in self.driver.backends.values():
            if not hasattr(backend, "pool_usage"):
                continue
            wanted = {(backend.vg, backend.pool)}
            wanted |= {(v["backend_data"].get("vg"), v["backend_data"].get("thin_pool"))
                       for v in self.driver.state.volumes() if v["options"]["backend"] == backend.name}
            for vg, pool in sorted(w for w in wanted if all(w)):
                try:
                    found[(vg, pool)] = backend.pool_usage(vg, pool)
                except Exception as exc:  # noqa: BLE001 - a missing pool is worth a line, not a crash
                    found[(vg, pool)] = {"vg": vg, "thin_pool": pool, "error": str(exc)}
        return list(found.values())

    def status(self) -> list[dict]:
        rows = []
        for entry in self.driver.list():
            try:
                volume, backend, spec = self._volume(entry["Name"])
                holder = backend.holder(spec)
                rows.append(self.driver.get(entry["Name"]) | {
                    "Holder": holder.host if holder else "", "Snapshots": backend.snapshot_list(spec)})
            except Exception as exc:  # noqa: BLE001 - one broken volume must not hide the others
                rows.append({"Name": entry["Name"], "Error": str(exc)})
        return rows

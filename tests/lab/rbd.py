"""RBD backend test harness: backends acting as separate "hosts" (own host_id and state_dir),
unique volumes, filesystems on attached devices, and a teardown that leaves nothing behind (mounts,
loop devices, rbd-fuse processes, images, trash entries) even when a test failed half-way."""
from __future__ import annotations

import contextlib
import os
import subprocess
import uuid
from pathlib import Path

from . import end_processes, mounts_under, pids_with_arg, remove_tree, sh, wait_until
from volplugin.backends.base import VolumeSpec
from volplugin.backends.rbd import RbdBackend

MiB = 1 << 20
MKFS = ["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard"]


class Hosts:
    def __init__(self, cluster, root: Path, **defaults):
        self.cluster = cluster
        self.root = Path(root)
        self.defaults = {"connect_timeout": 5, "op_timeout": 10, "fence_grace": 2,
                         "attach_methods": ("fuse",), **defaults}
        self.backends: list[RbdBackend] = []
        self.images: list[tuple[str, str]] = []
        self.mounted: list[str] = []

    def host(self, host_id: str, **options) -> RbdBackend:
        backend = RbdBackend(conf_path=self.cluster.conf_path, pool=self.cluster.pool, host_id=host_id,
                             state_dir=str(self.root / host_id), **{**self.defaults, **options})
        self.backends.append(backend)
        return backend

    def volume(self, size: int = 64 * MiB, pool: str | None = None) -> VolumeSpec:
        name = "t" + uuid.uuid4().hex[:10]
        self.images.append((pool or self.cluster.pool, name))
        return VolumeSpec(name=name, size=size, backend_data={"pool": pool} if pool else {})

    # --- filesystems --------------------------------------------------------------------------

    def mkfs_and_mount(self, device: str, label: str) -> Path:
        sh(MKFS + [device], timeout=60)
        return self.mount(device, label)

    def mount(self, device: str, label: str) -> Path:
        target = self.root / "mnt" / label
        target.mkdir(parents=True, exist_ok=True)
        sh(["mount", "-o", "noatime", device, str(target)], timeout=30)
        self.mounted.append(str(target))
        return target

    def unmount(self, target: Path) -> None:
        sh(["umount", str(target)], timeout=30)
        self.mounted.remove(str(target))

    # --- teardown -----------------------------------------------------------------------------

    def cleanup(self) -> list[str]:
        errors = []
        for target in reversed(self.mounted):
            sh(["umount", "-l", target], check=False, timeout=30)
        for backend in self.backends:
            for record in backend.records.all():
                spec = VolumeSpec(name=record["volume"], size=0,
                                  backend_data={"pool": record["pool"], "image": record["image"]})
                try:
                    backend.detach(spec)
                except Exception as exc:  # noqa: BLE001 - keep cleaning
                    errors.append(f"detach {spec.name} on {backend.host_id}: {exc}")
            with contextlib.suppress(Exception):
                backend.cleanup_orphans()
        end_attachments_under(self.root)  # last resort
        remove_tree(self.root)
        errors += purge_images(self.cluster.conf_path, self.images)
        return errors


def end_attachments_under(root: Path) -> None:
    """Whatever still runs with an argument under ``root`` (rbd-fuse: SIGKILL first, which also aborts
    the requests a hung one never answers), is mounted or looped under it."""
    devices = loops_under(root)  # before any lazy unmount hides their backing files' paths
    for proc in pids_with_arg(str(root)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, 9)
    end_processes(pids_with_arg(str(root)))
    for target in mounts_under(root):  # deepest first: the filesystems, then rbd-fuse's mounts
        sh(["umount", "-l", target], check=False, timeout=30)
    for device in devices:
        sh(["losetup", "--detach", device], check=False, timeout=30)


def loops_under(root: Path) -> list[str]:
    out = subprocess.run(["losetup", "--list", "--noheadings", "--output", "NAME,BACK-FILE"],
                         capture_output=True, text=True, timeout=30).stdout
    found = []
    for line in out.splitlines():
        parts = line.split(None, 1)
        if len(parts) == 2 and parts[1].startswith(str(root) + "/"):
            found.append(parts[0])
    return found


def purge_images(conf_path: str, images: list[tuple[str, str]]) -> list[str]:
    """Delete the test's images for good: live ones and trashed ones, snapshots first, clones first."""
    import rados
    import rbd
    errors = []
    if not images:
        return errors
    client = rados.Rados(conffile=conf_path, conf={"client_mount_timeout": "10", "rados_osd_op_timeout": "10",
                                                   "rados_mon_op_timeout": "10"})
    client.connect()
    try:
        for pool in {p for p, _ in images}:
            names = {n for p, n in images if p == pool}
            try:
                ioctx = client.open_ioctx(pool)
            except rados.ObjectNotFound:
                continue
            with ioctx:
                for entry in rbd.RBD().trash_list(ioctx):
                    if entry["name"] in names:
                        with contextlib.suppress(rbd.Error):
                            rbd.RBD().trash_restore(ioctx, entry["id"], entry["name"])
                for _ in range(3):  # clones before their parents
                    names = {n for n in names if _exists(ioctx, n) and not _remove_image(ioctx, n)}
                errors += [f"image {pool}/{n} could not be removed" for n in names]
    finally:
        client.shutdown()
    return errors


def _exists(ioctx, name: str) -> bool:
    import rbd
    try:
        rbd.Image(ioctx, name, read_only=True).close()
        return True
    except rbd.ImageNotFound:
        return False


def _remove_image(ioctx, name: str) -> bool:
    import rbd
    try:
        with rbd.Image(ioctx, name) as image:
            for snap in list(image.list_snaps()):
                if snap.get("namespace", 0) != 0:
                    continue
                if image.is_protected_snap(snap["name"]):
                    image.unprotect_snap(snap["name"])
                image.remove_snap(snap["name"])
        rbd.RBD().remove(ioctx, name)
    except rbd.ImageNotFound:
        return True
    except (rbd.ImageBusy, rbd.ImageHasSnapshots):
        return False  # a clone's parent, or still watched: retried after the others
    return True


def fuse_pid(backend: RbdBackend, spec: VolumeSpec) -> int:
    record = backend.records.load(backend.pool, spec.name)
    assert record and record["method"] == "fuse", record
    return record["pid"]


def read_image(conf_path: str, pool: str, name: str, offset: int, length: int) -> bytes:
    """Read straight from the cluster (what the OSDs hold, no client cache in between)."""
    import rados
    import rbd
    client = rados.Rados(conffile=conf_path, conf={"client_mount_timeout": "10", "rados_osd_op_timeout": "10"})
    client.connect()
    try:
        with client.open_ioctx(pool) as ioctx, rbd.Image(ioctx, name, read_only=True) as image:
            return image.read(offset, length)
    finally:
        client.shutdown()


def wait_for_watch_expiry(backend: RbdBackend, spec: VolumeSpec, timeout: float) -> None:
    wait_until(lambda: not (backend.holder(spec) and backend.holder(spec).alive), timeout,
               f"the dead holder's watch on {spec.name} to expire")

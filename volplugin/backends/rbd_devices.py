"""Ways to expose an RBD image as a block device on this host, tried in the configured order:

- ``krbd``: ``rbd device map -o noshare`` (plus ``noudev`` where no udev runs). ``noshare`` gives
  every mapping its own kernel client (so fencing one volume's client never fences another volume
  on the same host). Not ``exclusive``: the kernel cannot run the snapshot/resize requests librbd
  forwards to the lock owner, it must hand the lock over for them, which ``exclusive`` forbids.
- ``nbd``: ``rbd-nbd map --exclusive`` (a userspace librbd daemon behind /dev/nbdN; as lock owner
  librbd runs forwarded snapshot/resize requests itself, so refusing lock hand-over is harmless).
- ``fuse``: ``rbd-fuse -p POOL -r IMAGE DIR -f`` (one image per process: a pool-wide rbd-fuse opens
  every image and leaves watchers everywhere) + ``losetup --find --show --direct-io=off DIR/IMAGE``.
  Works without krbd or nbd in the kernel; rbd-fuse cannot take a client name, so it always
  connects as client.admin (with the configured keyring).

krbd and nbd share one shape (KernelMapping: map with a command, unmap by device, find mappings
by listing the host's). Each method's ``attach`` registers its own undo steps on the caller's
ExitStack and returns the facts to record (device, PIDs, paths); ``detach`` is idempotent and tears
down whatever is left.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import threading
import time

from plugincore.errors import BackendError
from plugincore.run import CommandError, run, spawn

from . import rbd_host as host

log = logging.getLogger("volplugin.rbd")


def _modprobe(module: str, sysfs: str) -> bool:
    if os.path.isdir(sysfs):
        return True
    try:
        run(["modprobe", module], timeout=10, check=False)
    except CommandError:
        return False
    return os.path.isdir(sysfs)


def _udev_running() -> bool:
    """systemd-udevd runs here (its control socket exists: libudev's own test)."""
    return os.path.exists("/run/udev/control")


class KernelMapping:
    """A method that maps an image to a kernel block device with one command (which prints the
    device path) and unmaps it by that path. The host's list of mappings (``mapped()``) is the
    truth: detach, health and leftovers need no process or file of ours."""
    name = program = module = module_sysfs = ""

    def __init__(self, cluster, state_dir: str):
        self.cluster = cluster
        self._usable = None

    def usable(self) -> bool:
        if self._usable is None:
            self._usable = bool(shutil.which(self.program)) and _modprobe(self.module, self.module_sysfs)
        return self._usable

    def _map_argv(self, pool: str, image: str) -> list[str]:
        raise NotImplementedError

    def _unmap_argv(self, device: str) -> list[str]:
        raise NotImplementedError

    def mapped(self) -> list[tuple[str, str, str]]:
        """(pool, image, device) of every mapping of a whole image (not a snapshot) on this host."""
        raise NotImplementedError

    def attach(self, pool: str, image: str, undo: contextlib.ExitStack) -> dict:
        # Undone by image, not by device, and registered first: a map command that failed or timed
        # out may have mapped all the same. While the caller holds the image's local lock, every
        # mapping of it here is this attach's.
        undo.callback(host.quietly, self.detach, {"pool": pool, "image": image})
        out = run([*self._map_argv(pool, image), *self.cluster.cli_args()],
                  timeout=self.cluster.op_timeout + 30).stdout.split()
        device = out[-1] if out else ""
        if not os.path.exists(device):
            raise BackendError(f"{self.program} mapped {pool}/{image} as {device or '(nothing)'}, but "
                               "there is no such device node (no udev and no devtmpfs on /dev?)")
        return {"device": device}

    def _unmap(self, device: str) -> None:
        run(self._unmap_argv(device), timeout=self.cluster.op_timeout + 30)

    def _mappings(self, pool: str, image: str) -> list[str]:
        return [device for p, i, device in self.mapped() if (p, i) == (pool, image)]

    def healthy(self, record: dict) -> bool:
        return record.get("device") in self._mappings(record["pool"], record["image"])

    def leftovers(self, pool: str, image: str) -> list[dict]:
        return [{"method": self.name, "pool": pool, "image": image, "device": d}
                for d in self._mappings(pool, image)]

    def detach(self, record: dict) -> None:
        for device in self._mappings(record["pool"], record["image"]):
            self._unmap(device)

    def refresh_size(self, record: dict, size: int) -> None:
        pass  # krbd follows header updates itself; rbd-nbd resizes its nbd device on them


class Krbd(KernelMapping):
    name, program, module, module_sysfs = "krbd", "rbd", "rbd", "/sys/bus/rbd"
    DEVICES = "/sys/bus/rbd/devices"

    @staticmethod
    def _udev_options() -> list[str]:
        # rbd waits for udev to have processed the new device's uevent (its rules add the
        # /dev/rbd/POOL/IMAGE links). Without a running udev (a container, the VM lane) it keeps
        # waiting (still after 40 s in the VM lane, until the timeout killed it) and leaves the
        # device mapped. noudev returns on the kernel's own uevent: devtmpfs has made /dev/rbdN.
        return [] if _udev_running() else ["noudev"]

    def _map_argv(self, pool: str, image: str) -> list[str]:
        return ["rbd", "device", "map", "--device-type", "krbd",
                "--options", ",".join(["noshare", *self._udev_options()]), f"{pool}/{image}"]

    def _unmap_argv(self, device: str) -> list[str]:
        udev = self._udev_options()  # unmap waits for udev's "remove" the same way
        return ["rbd", "device", "unmap", "--device-type", "krbd",
                *(["--options", ",".join(udev)] if udev else []), device]

    def mapped(self) -> list[tuple[str, str, str]]:
        found = []
        with contextlib.suppress(FileNotFoundError):
            for dev_id in os.listdir(self.DEVICES):
                try:
                    pool, image, snap = (_read(f"{self.DEVICES}/{dev_id}/{attr}")
                                         for attr in ("pool", "name", "current_snap"))
                except OSError:
                    continue  # unmapped meanwhile
                if snap == "-":
                    found.append((pool, image, f"/dev/rbd{dev_id}"))
        return found


class Nbd(KernelMapping):
    name, program, module, module_sysfs = "nbd", "rbd-nbd", "nbd", "/sys/module/nbd"

    def _map_argv(self, pool: str, image: str) -> list[str]:
        return ["rbd-nbd", "map", "--exclusive", f"{pool}/{image}"]

    def _unmap_argv(self, device: str) -> list[str]:
        return ["rbd-nbd", "unmap", device]

    def mapped(self) -> list[tuple[str, str, str]]:
        if not shutil.which("rbd-nbd"):
            return []
        out = run(["rbd-nbd", "list-mapped", "--format", "json"], timeout=30, check=False).stdout
        try:
            entries = json.loads(out or "[]")
        except ValueError:
            return []
        return [(e.get("pool"), e.get("image"), e["device"]) for e in entries
                if e.get("snap", "-") in ("-", "")]


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


class Fuse:
    name = "fuse"
    program = "rbd-fuse"

    def __init__(self, cluster, state_dir: str):
        self.cluster = cluster
        self.root = os.path.join(state_dir, "fuse")
        self._usable = None

    def usable(self) -> bool:
        if self._usable is None:
            self._usable = (bool(shutil.which(self.program)) and bool(shutil.which("losetup"))
                            and os.path.exists("/dev/fuse") and os.path.exists("/dev/loop-control"))
        return self._usable

    def directory(self, pool: str, image: str) -> str:
        return os.path.join(self.root, host.quote(pool), host.quote(image))

    def attach(self, pool: str, image: str, undo: contextlib.ExitStack) -> dict:
        directory = self.directory(pool, image)
        os.makedirs(directory, mode=0o700, exist_ok=True)
        # The writer never gives up on a write (rados_osd_op_timeout=0, as krbd): with an op timeout
        # from ceph.conf an OSD outage longer than it turned into EIO under the filesystem, which then
        # lost data it had already synced (found by the torture test: an outage during an unmount).
        env = {"CEPH_ARGS": " ".join([f"--client_mount_timeout={self.cluster.conf['client_mount_timeout']}",
                                      "--rados_osd_op_timeout=0", f"--log_file={directory}.log", "--admin_socket="]
                                     + ([f"--keyring={self.cluster.keyring}"] if self.cluster.keyring else []))}
        pid = spawn([self.program, "-c", self.cluster.conf_path, "-p", pool, "-r", image, directory, "-f"],
                    env=env)
        host.adopt(pid)
        start = host.proc_start_time(pid)
        facts = {"device": "", "pid": pid, "pid_start": start, "directory": directory}
        undo.callback(host.quietly, self.detach, {"pool": pool, "image": image, **facts})
        deadline = time.monotonic() + self.cluster.connect_timeout + 5
        while not host.is_mountpoint(directory):
            status = host.exit_status(pid)
            if status is not None:
                raise BackendError(f"rbd-fuse for {pool}/{image} exited ({status}) before mounting "
                                   f"(its log: {directory}.log)")
            if time.monotonic() > deadline:
                raise BackendError(f"rbd-fuse for {pool}/{image} did not mount within "
                                   f"{self.cluster.connect_timeout + 5:g}s (its log: {directory}.log)")
            time.sleep(0.01)
        backing = os.path.join(directory, image)
        out = run(["losetup", "--find", "--show", "--direct-io=off", backing],
                  timeout=self.cluster.op_timeout + 5).stdout
        facts["device"] = out.strip()
        facts["backing"] = backing
        return facts

    def healthy(self, record: dict) -> bool:
        host.reap()
        directory = record.get("directory") or self.directory(record["pool"], record["image"])
        backing = os.path.join(directory, record["image"])
        return (host.proc_matches(record.get("pid"), record.get("pid_start"), directory)
                and host.is_mountpoint(directory)
                and host.loop_backing_file(record.get("device") or "/dev/null") == backing)

    def directories(self) -> list[tuple[str, str]]:
        """(pool, image) of every FUSE directory under state_dir (attached or left over)."""
        found = []
        mounted = {m["mountpoint"] for m in host.mounts()}  # a dead FUSE mount fails stat (ENOTCONN)
        with contextlib.suppress(FileNotFoundError):
            for pool in sorted(os.listdir(self.root)):
                if os.path.isdir(os.path.join(self.root, pool)):
                    for image in sorted(os.listdir(os.path.join(self.root, pool))):
                        path = os.path.join(self.root, pool, image)
                        if path in mounted or os.path.isdir(path):
                            found.append((host.unquote(pool), host.unquote(image)))
        return found

    def leftovers(self, pool: str, image: str) -> list[dict]:
        directory = self.directory(pool, image)
        backing = os.path.join(directory, image)
        found = bool(host.loops_backed_by(backing) or host.is_mountpoint(directory)
                     or host.find_processes(directory, self.program))
        return [{"method": self.name, "pool": pool, "image": image, "directory": directory}] if found else []

    def detach(self, record: dict) -> None:
        """Loop device, then the FUSE mount, then the rbd-fuse process (by recorded or found PID).

        A fenced or cut-off rbd-fuse can leave a request it already read unanswered forever, and the
        process that sent it (losetup, umount) then sleeps uninterruptibly: no timeout can end it.
        So a watchdog SIGKILLs this image's rbd-fuse when a step overruns op_timeout: the kernel then
        aborts its requests, the step returns, and the (dead) mount comes off."""
        directory = record.get("directory") or self.directory(record["pool"], record["image"])
        backing = os.path.join(directory, record["image"])
        recorded = (record.get("pid"), record.get("pid_start"))
        step = self.cluster.op_timeout
        for device in host.loops_backed_by(backing):
            with self._watchdog(directory, recorded, step):
                run(["losetup", "--detach", device], timeout=step + 30, check=False)
        with self._watchdog(directory, recorded, step):
            self._unmount(directory, step)
        processes = self._processes(directory, recorded)
        for pid, start in processes:
            host.stop_process(pid, start, directory)
        if any(host.proc_matches(pid, start, directory) for pid, start in processes):
            raise BackendError(f"rbd-fuse for {record['pool']}/{record['image']} did not exit")
        with contextlib.suppress(OSError):
            os.rmdir(directory)

    def _processes(self, directory: str, recorded: tuple) -> list[tuple]:
        processes = host.find_processes(directory, self.program)
        if recorded[0] and recorded not in processes and host.proc_matches(*recorded, directory):
            processes.append(recorded)
        return processes

    @contextlib.contextmanager
    def _watchdog(self, directory: str, recorded: tuple, seconds: float):
        def kill():
            for pid, start in self._processes(directory, recorded):
                if host.proc_matches(pid, start, directory):
                    log.warning("rbd-fuse %d serving %s is stuck (fenced or cut off?): killing it", pid, directory)
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
        timer = threading.Timer(seconds, kill)
        timer.daemon = True
        timer.start()
        try:
            yield
        finally:
            timer.cancel()

    @staticmethod
    def _unmount(directory: str, step: float) -> None:
        deadline = time.monotonic() + 5
        while host.is_mountpoint(directory):
            # the loop device lets go of the file asynchronously: retry a busy unmount briefly
            if run(["umount", directory], timeout=step + 30, check=False).returncode == 0:
                continue
            if time.monotonic() > deadline:
                log.warning("lazy-unmounting busy or dead FUSE mount %s", directory)
                run(["umount", "--lazy", directory], timeout=step + 30, check=False)
                break
            time.sleep(0.05)

    def refresh_size(self, record: dict, size: int) -> None:
        """A loop device keeps its size until told to re-read its backing file's, and the kernel
        learns the FUSE file's new size only from a stat after its attribute cache (1 s) expired and
        rbd-fuse's librbd saw the header update: poll stat, then set the capacity."""
        if not record.get("device"):
            return
        backing = os.path.join(record.get("directory") or self.directory(record["pool"], record["image"]),
                               record["image"])
        deadline = time.monotonic() + self.cluster.op_timeout
        while self._size(backing) < size:
            if time.monotonic() > deadline:
                raise BackendError(f"{backing} still shows the old size after {self.cluster.op_timeout:g}s")
            time.sleep(0.1)
        run(["losetup", "--set-capacity", record["device"]], timeout=self.cluster.op_timeout + 5)

    def _size(self, backing: str) -> int:
        try:
            return self.cluster.bounded(lambda: os.stat(backing).st_size, 5, "stat")
        except (TimeoutError, OSError) as exc:
            raise BackendError(f"cannot stat {backing} (is its rbd-fuse stuck?): {exc or 'timed out'}") from None


METHODS = {cls.name: cls for cls in (Krbd, Nbd, Fuse)}


def make_methods(names: tuple, cluster, state_dir: str) -> dict:
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise ValueError(f"unknown attach methods {unknown}; known: {', '.join(METHODS)}")
    return {n: METHODS[n](cluster, state_dir) for n in METHODS}


def expose(methods: dict, order: tuple, pool: str, image: str, undo: contextlib.ExitStack) -> dict:
    """Attach with the first usable method that works; errors of every method tried if none does."""
    errors = []
    for name in order:
        method = methods[name]
        if not method.usable():
            continue
        with contextlib.ExitStack() as attempt:
            try:
                facts = method.attach(pool, image, attempt)
            except BackendError as exc:
                log.warning("attach of %s/%s via %s failed: %s", pool, image, name, exc)
                errors.append(f"{name}: {exc}")
                continue
            undo.push(attempt.pop_all())
            return {"method": name, **facts}
    if not errors:
        raise BackendError(f"no way to attach {pool}/{image} on this host: none of "
                           f"{', '.join(order)} is available (krbd, rbd-nbd, or rbd-fuse with loop devices)")
    raise BackendError(f"attaching {pool}/{image} failed: " + "; ".join(errors))

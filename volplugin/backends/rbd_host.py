"""Host-side facts and records for RBD attachments: what this host has attached, kept under state_dir,
and how to check it against reality (processes, mounts, loop devices)."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import time
import urllib.parse

MOUNTINFO = "/proc/self/mountinfo"
log = logging.getLogger("volplugin.rbd")


def quietly(fn, *args) -> None:
    """Run an undo step; log its failure instead of raising it over the original error."""
    try:
        fn(*args)
    except Exception as exc:  # noqa: BLE001 - undo must not mask the error being handled
        log.warning("undo step %s failed: %s", getattr(fn, "__name__", fn), exc)


# --- records ----------------------------------------------------------------------------------

class LocalRecords:
    """One JSON file per attached image: ``<state_dir>/attachments/<pool>/<image>.json``."""

    def __init__(self, state_dir: str):
        self.root = os.path.join(state_dir, "attachments")
        os.makedirs(self.root, mode=0o700, exist_ok=True)

    def _path(self, pool: str, image: str) -> str:
        return os.path.join(self.root, quote(pool), quote(image) + ".json")

    def load(self, pool: str, image: str) -> dict | None:
        try:
            with open(self._path(pool, image)) as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except ValueError:
            return {"pool": pool, "image": image, "volume": image, "method": "", "broken": True}

    def save(self, record: dict) -> None:
        path = self._path(record["pool"], record["image"])
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(record, f, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def drop(self, pool: str, image: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(pool, image))

    def all(self) -> list[dict]:
        found = []
        for pool_dir in sorted(os.listdir(self.root)):
            directory = os.path.join(self.root, pool_dir)
            if not os.path.isdir(directory):
                continue
            for entry in sorted(os.listdir(directory)):
                if entry.endswith(".json"):
                    record = self.load(unquote(pool_dir), unquote(entry[:-5]))
                    if record is not None:
                        found.append(record)
        return found


def quote(name: str) -> str:
    return urllib.parse.quote(name, safe="")


def unquote(name: str) -> str:
    return urllib.parse.unquote(name)


# --- processes --------------------------------------------------------------------------------

def proc_start_time(pid: int) -> int | None:
    """The process' start time (clock ticks since boot), None if it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def proc_cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


_children: set[int] = set()  # helpers this process spawned and has not reaped yet


def adopt(pid: int) -> None:
    """Remember a helper we spawned, so that any later call reaps it once it exits."""
    _children.add(pid)


def reap() -> None:
    """Collect the exit status of every exited helper this process spawned, so none lingers as a
    zombie in a long-lived worker (another worker may be the one that ended it). Never waits for a
    PID we did not spawn: that could steal another thread's subprocess status."""
    for child in list(_children):
        try:
            done, _ = os.waitpid(child, os.WNOHANG)
        except ChildProcessError:
            done = child
        if done:
            _children.discard(child)


def exit_status(pid: int) -> str | None:
    """How our child ``pid`` ended ("exit status N" / "signal N"), None while it runs."""
    try:
        done, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return "gone" if proc_start_time(pid) is None else None
    if done == 0:
        return None
    _children.discard(pid)
    if os.WIFSIGNALED(status):
        return f"signal {os.WTERMSIG(status)}"
    return f"exit status {os.WEXITSTATUS(status)}"


def proc_matches(pid: int | None, start: int | None, needle: str) -> bool:
    """Same process as recorded: alive, same start time, ``needle`` in its command line."""
    if not pid:
        return False
    reap()
    current = proc_start_time(pid)
    if current is None or (start is not None and current != start):
        return False
    return needle in proc_cmdline(pid)


def stop_process(pid: int, start: int | None, needle: str, wait: float = 5.0) -> None:
    """Wait for a recorded helper to exit, then SIGTERM, then SIGKILL. Never signals a PID whose
    identity (start time, command line) does not match the record."""
    for sig in (None, signal.SIGTERM, signal.SIGKILL):
        if sig is not None and proc_matches(pid, start, needle):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while proc_matches(pid, start, needle):
            if time.monotonic() > deadline:
                break
            time.sleep(0.02)
        else:
            return


def find_processes(needle: str, program: str) -> list[tuple[int, int | None]]:
    """(pid, start time) of live processes running ``program`` with ``needle`` in their arguments."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            argv = proc_cmdline(int(entry))
            if argv and os.path.basename(argv[0]) == program and needle in argv:
                found.append((int(entry), proc_start_time(int(entry))))
    return [(pid, start) for pid, start in found if start is not None]


# --- mounts and block devices -----------------------------------------------------------------

def _unescape(field: str) -> str:
    return field.encode().decode("unicode_escape") if "\\" in field else field


def mounts() -> list[dict]:
    """Entries of /proc/self/mountinfo: mountpoint, fstype, source, dev (major:minor)."""
    entries = []
    with open(MOUNTINFO) as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, tail = left.split(), right.split()
            if len(fields) >= 5 and len(tail) >= 2:
                entries.append({"mountpoint": _unescape(fields[4]), "dev": fields[2],
                                "fstype": tail[0], "source": _unescape(tail[1])})
    return entries


def is_mountpoint(path: str) -> bool:
    return any(m["mountpoint"] == path for m in mounts())


def device_number(device: str) -> str | None:
    try:
        st = os.stat(device)
    except OSError:
        return None
    return f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"


def device_in_use(device: str) -> bool:
    """A filesystem on ``device`` is mounted somewhere (in this mount namespace)."""
    number = device_number(device)
    return any(m["source"] == device or (number and m["dev"] == number) for m in mounts())


def loop_backing_file(device: str) -> str | None:
    name = os.path.basename(device)
    try:
        with open(f"/sys/block/{name}/loop/backing_file") as f:
            return f.read().strip()
    except OSError:
        return None


def loops_backed_by(path: str) -> list[str]:
    """Loop devices whose backing file is ``path``."""
    found = []
    with contextlib.suppress(FileNotFoundError):
        for name in sorted(os.listdir("/sys/block")):
            if name.startswith("loop") and loop_backing_file("/dev/" + name) in (path, path + " (deleted)"):
                found.append("/dev/" + name)
    return found

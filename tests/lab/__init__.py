"""Test lab: throwaway network namespaces, a real dockerd inside one, a busybox image, the plugin.

Everything here runs as root and only touches what the lab itself created: network namespaces
whose names start with LAB_PREFIX, processes it started (tracked by PID and start time),
mounts and files under temporary directories it made, and plugin sockets with unique names.
Nothing is ever done in the root network namespace, except inside the VM lane (a throwaway guest
whose only NICs sit on a private emulated wire): there a dockerd may run in the guest's initial
namespace, where SR-IOV VFs appear (``in_vm_lane()``).

This module holds the shared plumbing (one subprocess helper, HTTP over a Unix socket, process
bookkeeping); netns.py, dockerd.py, image.py and plugin.py build on it.
"""
from __future__ import annotations

import atexit
import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCKERD = "/usr/sbin/dockerd"
DOCKER = "/usr/bin/docker"  # NOT /usr/local/bin/docker: a newer client than this engine
NSENTER = "/usr/bin/nsenter"
IP = "/usr/sbin/ip"
BUSYBOX = "/bin/busybox"  # also our ping/arping: the host has no iputils
NETNS_DIR = "/run/netns"
PLUGIN_DIR = "/run/docker/plugins"  # hard-coded in dockerd, shared by every dockerd on the host
OWNER_PID = os.getpid()  # pyroute2 forks helpers from us: they must never run our cleanups
LAB_PREFIX = f"nplab-{OWNER_PID}-"  # every netns and temp dir of this process starts with it
PLUGIN_ACCEPT = "application/vnd.docker.plugins.v1.2+json"


_cleanups: list[tuple[int, object]] = []


def register_cleanup(order: int, fn) -> None:
    """Run ``fn()`` from cleanup_all(), lowest ``order`` first (plugins, dockerds, netns)."""
    _cleanups.append((order, fn))


@atexit.register
def cleanup_all() -> list[str]:
    """Last-resort teardown of everything the lab still owns (session end, atexit).
    Returns the errors met; never raises. A no-op in forked children (pyroute2's helpers)."""
    if os.getpid() != OWNER_PID:
        return []
    errors = []
    for _, fn in sorted(_cleanups, key=lambda c: c[0]):
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - keep going, report at the end
            errors.append(f"{getattr(fn, '__qualname__', fn)}: {exc}")
    return errors


def in_vm_lane() -> bool:
    """True inside scripts/vm-lane's guest (its init's own /run/vm-lane exists only there)."""
    return os.environ.get("NETPLUGIN_VM_LANE") == "1" and os.path.isfile("/run/vm-lane/vm.conf")


def skip_reason() -> str | None:
    """Why the lab can't run here, or None."""
    if os.geteuid() != 0:
        return "the e2e lab needs root (network namespaces, dockerd)"
    for path in (DOCKERD, DOCKER, NSENTER, IP, BUSYBOX):
        if not os.access(path, os.X_OK):
            return f"{path} is missing"
    return None


class ShError(subprocess.CalledProcessError):
    """A failed sh() call; str() shows the command, exit code, stdout and stderr."""

    def __str__(self) -> str:
        out = (self.stdout or "").strip()
        err = (self.stderr or "").strip()
        return f"{' '.join(map(str, self.cmd))} -> exit {self.returncode}\nstdout: {out}\nstderr: {err}"


def sh(argv, *, netns: str | None = None, timeout: float = 30.0, check: bool = True,
       input: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``argv`` (a list, never a shell string), inside ``netns`` if given; text output.

    ``ip netns exec`` is used for netns commands: it also remounts /sys for that netns, so tools
    reading /sys/class/net see the right interfaces. Long-running daemons use nsenter instead.
    """
    argv = [str(a) for a in argv]
    if netns is not None:
        argv = [IP, "netns", "exec", netns, *argv]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, input=input,
                          env=env, stdin=None if input is not None else subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise ShError(proc.returncode, argv, proc.stdout, proc.stderr)
    return proc


def wait_until(predicate, timeout: float, what: str, interval: float = 0.05):
    """Poll ``predicate`` until it returns a truthy value; TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(interval)


def tail(path: Path, lines: int = 60, width: int = 300) -> str:
    """The last ``lines`` lines of a log file, each cut to ``width`` characters ('' if the
    file doesn't exist): enough to read a failure, not a pyroute2 debug dump."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 256 * 1024))
            data = f.read().decode(errors="replace")
    except FileNotFoundError:
        return ""
    cut = [ln if len(ln) <= width else ln[:width] + " [...]" for ln in data.splitlines()[-lines:]]
    return "\n".join(cut)


# --- HTTP over a Unix socket -------------------------------------------------------------------

class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self.unix_path = str(path)

    def connect(self):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.unix_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def http_unix(path, method: str, url: str, body: bytes | None = None,
              headers: dict | None = None, timeout: float = 10.0) -> tuple[int, bytes]:
    """One HTTP request over the Unix socket ``path``; returns (status, body)."""
    conn = UnixHTTPConnection(path, timeout)
    try:
        conn.request(method, url, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def plugin_post(path, endpoint: str, body=None, timeout: float = 10.0) -> tuple[int, dict]:
    """POST like dockerd does: JSON body (empty for None), Docker's Accept, no Content-Type."""
    data = b"" if body is None else json.dumps(body).encode()
    status, raw = http_unix(path, "POST", endpoint, data, {"Accept": PLUGIN_ACCEPT}, timeout)
    try:
        reply = json.loads(raw) if raw.strip() else {}
    except ValueError:
        reply = {"_raw": raw.decode(errors="replace")}
    return status, reply


# --- processes we started ----------------------------------------------------------------------

def _stat(pid: int) -> tuple[int, int, int] | None:
    """(ppid, pgid, starttime) of ``pid``, or None if it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[1]), int(fields[2]), int(fields[19])


class ProcRef:
    """A PID pinned to its start time, so a recycled PID is never signalled."""

    def __init__(self, pid: int):
        self.pid = pid
        st = _stat(pid)
        self.start = st[2] if st else None

    def alive(self) -> bool:
        st = _stat(self.pid)
        return st is not None and st[2] == self.start

    def signal(self, sig: int) -> None:
        if self.alive():
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def __repr__(self) -> str:
        return f"ProcRef({self.pid})"


def group_alive(pgid: int) -> bool:
    """True while any live (non-zombie) process is in process group ``pgid``."""
    return any(st is not None and st[1] == pgid for st in map(_stat, _all_pids()))


def _all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def descendants(pid: int) -> list[ProcRef]:
    """Live descendants of ``pid`` (not ``pid`` itself), parents before children."""
    children: dict[int, list[int]] = {}
    for p in _all_pids():
        st = _stat(p)
        if st:
            children.setdefault(st[0], []).append(p)
    out, todo = [], list(children.get(pid, []))
    while todo:
        p = todo.pop(0)
        out.append(ProcRef(p))
        todo.extend(children.get(p, []))
    return out


def pids_with_arg(needle: str) -> list[ProcRef]:
    """Processes whose command line contains ``needle`` (a unique path the lab created)."""
    found = []
    for p in _all_pids():
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if needle in cmdline and p != os.getpid():
            found.append(ProcRef(p))
    return found


def end_processes(refs: list[ProcRef], timeout: float = 5.0) -> list[ProcRef]:
    """SIGTERM ``refs``, wait up to ``timeout``, SIGKILL what is left; returns the survivors."""
    refs = [r for r in refs if r.alive()]
    for r in refs:
        r.signal(signal.SIGTERM)
    try:
        wait_until(lambda: not any(r.alive() for r in refs), timeout, "processes to exit")
    except TimeoutError:
        for r in refs:
            r.signal(signal.SIGKILL)
        try:
            wait_until(lambda: not any(r.alive() for r in refs), 5.0, "processes to die")
        except TimeoutError:
            pass
    return [r for r in refs if r.alive()]


def stop_popen(proc: subprocess.Popen, timeout: float = 20.0, sig: int = signal.SIGTERM) -> int:
    """Signal a child we started, wait, SIGKILL after ``timeout``; returns its exit status."""
    if proc.poll() is None:
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            pass
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait(10)


# --- mounts under our own directories ----------------------------------------------------------

def mounts_under(root: Path) -> list[str]:
    """Mount points at or below ``root`` (from /proc/self/mountinfo), deepest first."""
    root = str(root).rstrip("/")
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mnt = line.split()[4].encode().decode("unicode_escape")  # \040 etc.
            if mnt == root or mnt.startswith(root + "/"):
                found.append(mnt)
    return sorted(set(found), key=lambda m: m.count("/"), reverse=True)


def wait_for_own_mount_namespace(pid: int, timeout: float = 10.0) -> None:
    """Until ``pid`` (e.g. ``unshare --mount sleep``: a stand-in for a container holding a copy of a
    volume mount) runs in a mount namespace other than ours."""
    own, deadline = os.stat("/proc/self/ns/mnt").st_ino, time.monotonic() + timeout
    while os.stat(f"/proc/{pid}/ns/mnt").st_ino == own:
        if time.monotonic() > deadline:
            raise TimeoutError(f"process {pid} never entered a mount namespace of its own")
        time.sleep(0.02)


def remove_tree(root: Path) -> None:
    """Lazily unmount everything under ``root`` (deepest first), then delete it."""
    for _ in range(3):  # a lazy unmount can uncover a mount underneath
        mnts = mounts_under(root)
        if not mnts:
            break
        for mnt in mnts:
            sh(["umount", "-l", mnt], check=False, timeout=10)
    shutil.rmtree(root, ignore_errors=True)


def sigterm_as_interrupt(signum, frame):
    """SIGTERM handler for test sessions: a CI timeout unwinds through the fixtures like Ctrl-C.
    pyroute2 forks helpers that inherit it and are ended with SIGTERM: those just die."""
    if os.getpid() != OWNER_PID:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        os._exit(128 + signum)
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def sigterm_unwinds():
    """For a session fixture: while it is active, SIGTERM (a CI timeout) unwinds through the fixtures
    like Ctrl-C instead of killing pytest without teardown. Nested uses leave the first one in charge."""
    old = signal.getsignal(signal.SIGTERM)
    if old == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, sigterm_as_interrupt)
    try:
        yield
    finally:
        if old == signal.SIG_DFL:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)

"""An embedded single-node Ceph cluster (one mon, one bluestore or memstore OSD, no mgr) in one directory.

volplugin's default backend when no Ceph is configured, and the tests' throwaway cluster. The
directory holds it all: ceph.conf, monmap, stores (the OSD's a sparse block file: data survives
restarts), pid files, logs, admin sockets, cluster.json (fsid, ports, OSD id, creation progress).
The daemons daemonize: they outlive their starter (a plugin restart keeps the cluster). Steps are
idempotent, under an flock on directory/cluster.lock (several processes may call ensure_running());
only processes whose cmdline is ceph-mon/ceph-osd with *our* conf are ever signalled.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import socket
import time
import uuid

from plugincore.errors import BackendError
from plugincore.locks import LockDir
from plugincore.run import CommandError, run

from .cephlab_conf import PG_NUM, STORE_SETTINGS, conf_text

CEPH_MON = "/usr/bin/ceph-mon"
CEPH_OSD = "/usr/bin/ceph-osd"
MONMAPTOOL = "/usr/bin/monmaptool"
_EXE = {"mon": CEPH_MON, "osd": CEPH_OSD}
MON_ID = "a"
PROBE_OBJECT = "cephlab-probe"
_CONF_UNSAFE = re.compile(r"[\n\r#;$=\[\]]")  # would change the meaning of a ceph.conf line


class CephLabError(BackendError):
    """The embedded cluster could not be created, started, stopped or reached."""


class EmbeddedCeph:
    """One single-node cluster in ``directory``, which it owns entirely (destroy() removes it).
    mon_port 0: pick a free loopback port at creation; cluster.json remembers it."""

    def __init__(self, directory: str, *, mon_port: int = 0, pool: str = "rbd", store_gib: int = 20,
                 osd_memory_target_mib: int = 1024, watch_timeout: int = 30,
                 client_timeout: int = 30, objectstore: str = "bluestore"):
        self.directory = os.path.abspath(directory)
        if _CONF_UNSAFE.search(self.directory) or not re.fullmatch(r"[A-Za-z0-9_.-]+", pool) \
                or osd_memory_target_mib < 896 or objectstore not in STORE_SETTINGS:  # 896: Ceph's minimum
            raise ValueError(f"unusable directory {directory!r}, pool {pool!r}, memory target or "
                             f"objectstore {objectstore!r}")
        self.requested_mon_port, self.pool, self.store_gib = mon_port, pool, store_gib
        self.objectstore = objectstore
        self.osd_memory_target_mib, self.watch_timeout = osd_memory_target_mib, watch_timeout
        self.client_timeout = client_timeout  # for clients using conf_path (the plugin)
        self.conf_path = os.path.join(self.directory, "ceph.conf")

    def _path(self, *parts: str) -> str:
        return os.path.join(self.directory, *parts)

    def log_path(self, kind: str) -> str:
        """The log file of the "mon" or "osd" daemon."""
        return self._path("log", f"{kind}.log")

    def _log_excerpt(self, kind: str) -> str:
        return f"log {self.log_path(kind)}:\n{_tail(self.log_path(kind))}"

    def ensure_running(self, timeout: float = 90) -> "EmbeddedCeph":
        """Create the cluster on first use, start whichever daemon is not running, and return once
        the pool accepts I/O. Cheap when all runs already (a probe write and read)."""
        deadline = time.monotonic() + timeout
        with self._locked(timeout):
            state = self._identity(self._load_state())
            self._write_conf(state)
            for sub in ("run", "log", "crash"):
                os.makedirs(self._path(sub), mode=0o700, exist_ok=True)
            # cluster.json's "stage": the last creation step done (an interrupted one is redone)
            if state["stage"] == "new":
                self._mkfs_mon(state, deadline)
                state = self._save_state(dict(state, stage="mon"))
            self._start("mon", deadline)
            if state["stage"] in ("new", "mon"):
                state = self._save_state(dict(self._mkfs_osd(state, deadline), stage="osd"))
            self._start("osd", deadline)
            if state["stage"] != "ready":
                self._create_pool(deadline)
                state = self._save_state(dict(state, stage="ready"))
            self._wait_for_io(deadline)
        return self

    def is_running(self) -> bool:
        """Both daemons of this directory are alive (says nothing about I/O readiness)."""
        return self._daemon("mon") is not None and self._daemon("osd") is not None

    def daemon_pids(self) -> dict[str, int]:
        """PIDs of this directory's running daemons, by kind ("mon", "osd")."""
        return {kind: proc[0] for kind in ("mon", "osd") if (proc := self._daemon(kind))}

    def stop(self, timeout: float = 30, kinds: tuple[str, ...] = ("osd", "mon")) -> None:
        """Stop the OSD, then the mon (the OSD tells the mon it is going down). Idempotent."""
        with self._locked(timeout + 30):
            for kind in kinds:
                self._terminate(kind, timeout)

    def stop_osd(self, timeout: float = 30) -> None:
        """Cleanly stop only the OSD (the mon marks it down at once): for fault tests."""
        self.stop(timeout, kinds=("osd",))

    def start_osd(self, timeout: float = 60) -> None:
        """Start the OSD again and wait until the pool accepts I/O."""
        deadline = time.monotonic() + timeout
        with self._locked(timeout):
            self._start("osd", deadline)
            self._wait_for_io(deadline)

    def destroy(self) -> None:
        """Stop the daemons and remove the whole directory."""
        if os.path.isdir(self.directory) and os.listdir(self.directory) \
                and not os.path.exists(self._path("cluster.json")):
            # A wrong path must never be wiped: only a directory that holds one of our clusters.
            raise CephLabError(f"{self.directory} holds no embedded cluster; not removing it")
        self.stop()  # (creates a missing directory for its lock file: removed just below)
        shutil.rmtree(self.directory)

    def _load_state(self) -> dict:
        with contextlib.suppress(FileNotFoundError), open(self._path("cluster.json")) as f:
            return json.load(f)
        return {}

    def _save_state(self, state: dict) -> dict:
        _write_atomically(self._path("cluster.json"), json.dumps(state, indent=2) + "\n")
        return state

    def _identity(self, state: dict) -> dict:
        """Fsid, ports, OSD uuid: chosen once, then kept (the monmap and the OSD store are bound
        to them)."""
        wanted = self.requested_mon_port
        if state and wanted and wanted != state["mon_port"]:
            raise CephLabError(f"the cluster in {self.directory} listens on port "
                               f"{state['mon_port']} (fixed in its monmap), not {wanted}")
        if state:
            return state
        # msgr2 on mon_port for librados, and msgr1 too: kernel clients (krbd) default to it.
        ports = _free_ports(2, exclude={wanted})
        return self._save_state({"fsid": str(uuid.uuid4()), "mon_port": wanted or ports[0],
                                 "mon_port_v1": ports[1], "osd_uuid": str(uuid.uuid4()), "stage": "new"})

    def _mon_addrs(self, state: dict) -> str:
        return f"[v2:127.0.0.1:{state['mon_port']},v1:127.0.0.1:{state['mon_port_v1']}]"

    def _write_conf(self, state: dict) -> None:
        """(Re)written at every ensure_running(), so changed settings apply at the next start."""
        d = self.directory
        # Admin sockets only for the daemons; none if the path exceeds AF_UNIX's 107 bytes.
        asok = {f"{kind}_asok": f"{d}/run/{kind}.asok" if len(d) + 14 <= 107 else ""
                for kind in ("mon", "osd")}
        values = dict(asok, d=d, fsid=state["fsid"], mon_host=self._mon_addrs(state),
                      block_size=self.store_gib << 30, memory=self.osd_memory_target_mib << 20,
                      watch_timeout=self.watch_timeout, client_timeout=self.client_timeout,
                      objectstore=self.objectstore)
        text = conf_text(values, self.objectstore)
        with contextlib.suppress(FileNotFoundError), open(self.conf_path) as f:
            if f.read() == text:
                return
        _write_atomically(self.conf_path, text)

    def _mkfs_mon(self, state: dict, deadline: float) -> None:
        # A mkfs whose starter was killed may still run (it holds the pid file): end it first.
        self._terminate("mon", 10)
        shutil.rmtree(self._path("mon"), ignore_errors=True)  # a half-made store from a crash
        monmap = self._path("monmap")
        run([MONMAPTOOL, "--create", "--clobber", "--fsid", state["fsid"], "--addv", MON_ID,
             self._mon_addrs(state), "--enable-all-features", "--set-min-mon-release", "pacific",
             monmap], timeout=_left(deadline, 30))
        self._run_logged("mon", [CEPH_MON, "-c", self.conf_path, "--mkfs", "-i", MON_ID,
                                 "--monmap", monmap], deadline)

    def _mkfs_osd(self, state: dict, deadline: float) -> dict:
        with self._client(deadline) as cluster:
            # "osd new" with the same uuid returns the same id: safe to repeat after a crash.
            out = _mon_command(cluster, {"prefix": "osd new", "uuid": state["osd_uuid"], "format": "json"})
        state = dict(state, osd_id=int(json.loads(out)["osdid"]))
        self._terminate("osd", 10)  # as for the mon: a leftover mkfs
        shutil.rmtree(self._path("osd"), ignore_errors=True)  # a half-made store from a crash
        os.makedirs(self._path("osd"), mode=0o700)
        self._run_logged("osd", [CEPH_OSD, "-c", self.conf_path, "-i", str(state["osd_id"]),
                                 "--mkfs", "--osd-uuid", state["osd_uuid"]], deadline)
        return state

    def _create_pool(self, deadline: float) -> None:
        import rbd
        with self._client(deadline) as cluster:  # an existing pool (a repeat) is a success
            _mon_command(cluster, {"prefix": "osd pool create", "pool": self.pool,
                                   "pg_num": PG_NUM, "pgp_num": PG_NUM, "pool_type": "replicated"})
        self._wait_for_io(deadline)  # pool_init writes an object: the PGs must be active
        with self._client(deadline) as cluster, cluster.open_ioctx(self.pool) as ioctx:
            rbd.RBD().pool_init(ioctx, False)

    def _daemon(self, kind: str) -> tuple[int, int] | None:
        """(pid, start time) of this directory's live ``kind`` daemon per its pid file, or None:
        a stale pid file (kill -9) or a recycled pid running something else reads as None."""
        try:
            with open(self._path("run", f"{kind}.pid")) as f:
                pid = int(f.read().strip())
            start = _start_time(pid)
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")
        except (OSError, ValueError):
            return None
        if start is not None and argv == [""]:
            # Exiting: its memory (so its cmdline) is gone but threads still hold the pid file's
            # lock. Wait for the end, else a new daemon would fail on that lock.
            _wait_gone(pid, start, 10)
            return None
        ours = os.path.basename(argv[0]) == os.path.basename(_EXE[kind]) and self.conf_path in argv
        return (pid, start) if start is not None and ours else None

    def _start(self, kind: str, deadline: float) -> None:
        if self._daemon(kind):
            return
        who = MON_ID if kind == "mon" else str(self._load_state().get("osd_id", 0))
        # Without -f it forks; the parent exits once the child is initialised (or with the error).
        self._run_logged(kind, [_EXE[kind], "-c", self.conf_path, "-i", who], deadline)
        if not self._daemon(kind):
            raise CephLabError(f"ceph-{kind} exited right after starting; {self._log_excerpt(kind)}")

    def _run_logged(self, kind: str, argv: list[str], deadline: float) -> None:
        try:
            run(argv, timeout=_left(deadline, 120))
        except CommandError as exc:
            raise CephLabError(f"{exc}; {self._log_excerpt(kind)}") from exc

    def _terminate(self, kind: str, timeout: float) -> None:
        """SIGTERM, SIGKILL after ``timeout``; returns once every thread of it is gone."""
        if (proc := self._daemon(kind)) is None:
            return
        pid, start = proc
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            if _wait_gone(pid, start, wait):
                return
        raise CephLabError(f"ceph-{kind} {pid} of {self.directory} survived SIGKILL")

    @contextlib.contextmanager
    def _client(self, deadline: float, op_timeout: float = 5):
        """A connected librados handle with short timeouts, for probes and mon commands."""
        import rados
        import rbd
        cluster = rados.Rados(conffile=self.conf_path, conf=dict.fromkeys(
            ("client_mount_timeout", "rados_osd_op_timeout", "rados_mon_op_timeout"),
            str(int(_left(deadline, op_timeout)))))
        try:
            cluster.connect()
            yield cluster
        except (rados.Error, rbd.Error) as exc:
            raise CephLabError(f"{type(exc).__name__}: {exc}") from exc
        finally:
            cluster.shutdown()

    def _wait_for_io(self, deadline: float) -> None:
        """Return once a tiny object can be written and read back in the pool."""
        last, waiting_since = None, time.monotonic()
        while True:
            # A daemon that died since we looked, or was still dying then (a kill -9 just sent),
            # is started again; one that cannot start raises from _start().
            for kind in ("mon", "osd"):
                self._start(kind, deadline)
            try:
                with self._client(deadline) as cluster:
                    # A client whose map still shows the OSD's previous instance asks for a newer
                    # map only 10-15 s later: probe once the map names the running process (its
                    # pid is its address nonce), or after 10 s in case that ever stops being true.
                    if self._osd_booted(cluster) or time.monotonic() - waiting_since > 10:
                        with cluster.open_ioctx(self.pool) as ioctx:
                            ioctx.write_full(PROBE_OBJECT, b"ok")
                            if ioctx.read(PROBE_OBJECT) == b"ok":
                                return
            except CephLabError as exc:
                last = exc
            if time.monotonic() >= deadline:
                raise CephLabError(f"pool {self.pool} of {self.directory} accepts no I/O (last "
                                   f"error: {last}); osd {self._log_excerpt('osd')}")
            time.sleep(0.05)

    def _osd_booted(self, cluster) -> bool:
        """The osdmap shows our OSD up at the address of the process now running."""
        pid, osd_id = (self._daemon("osd") or (0,))[0], self._load_state().get("osd_id", 0)
        dump = json.loads(_mon_command(cluster, {"prefix": "osd dump", "format": "json"}))
        return any(osd.get("osd") == osd_id and osd.get("up") and any(
            a.get("nonce") == pid for a in osd.get("public_addrs", {}).get("addrvec", []))
            for osd in dump.get("osds", []))

    def _locked(self, timeout: float):
        return LockDir(self.directory).hold("cluster", timeout)  # flock on directory/cluster.lock


def _mon_command(cluster, cmd: dict) -> bytes:
    ret, out, err = cluster.mon_command(json.dumps(cmd), b"")
    if ret != 0:
        raise CephLabError(f"ceph {cmd['prefix']} failed: {err or os.strerror(-ret)}")
    return out


def _left(deadline: float, cap: float) -> float:
    """Seconds until ``deadline``, at most ``cap``, at least 1 (a late step still gets a try)."""
    return max(1.0, min(cap, deadline - time.monotonic()))


def _start_time(pid: int) -> int | None:
    """Start time of ``pid`` (with the pid, it names one process) while any thread of it lives: an
    exiting daemon's main thread is a zombie while others still hold its files (pid file lock)."""
    with contextlib.suppress(OSError, IndexError, ValueError):
        with open(f"/proc/{pid}/stat") as f:
            start = int(f.read().rsplit(")", 1)[1].split()[19])
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X"):
                    return start
    return None


def _wait_gone(pid: int, start: int, timeout: float) -> bool:
    """Wait up to ``timeout`` for process (pid, start) to be gone; whether it is."""
    end = time.monotonic() + timeout
    while _start_time(pid) == start and time.monotonic() < end:
        time.sleep(0.02)
    return _start_time(pid) != start


def _free_ports(count: int, exclude: set) -> list[int]:
    """``count`` TCP ports free on 127.0.0.1, above the OSDs' 6800-7300 and below the ephemeral
    range (a mon port is the cluster's for life: no outgoing connection may ever hold it)."""
    free: list[int] = []
    for port in random.SystemRandom().sample(range(10000, 32768), 500):
        with socket.socket() as s, contextlib.suppress(OSError):
            s.bind(("127.0.0.1", port))
            free += [] if port in exclude else [port]
        if len(free) == count:
            return free
    raise CephLabError("found no free TCP port on 127.0.0.1 for the mon")


def _write_atomically(path: str, text: str) -> None:
    with open(tmp := f"{path}.tmp", "w") as f:  # written under the cluster lock only
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # readers (clients reading ceph.conf) never see a half-written file


def _tail(path: str, lines: int = 25) -> str:
    with contextlib.suppress(OSError), open(path, "rb") as f:
        f.seek(max(0, os.fstat(f.fileno()).st_size - 64 * 1024))
        return "\n".join(f.read().decode(errors="replace").splitlines()[-lines:])
    return "(no log)"

"""A real single-member etcd (Debian's etcd-server 3.4) for tests of netplugin's multi-host control plane.

Each server keeps everything in its own directory ``<workdir>/nplab-<pid>-etcd-<n>`` (LAB_PREFIX): the
data dir and one log file (etcd's zap log goes to stderr, which goes there, panics included). The pid
in the name tells a later run which servers a killed run left behind (stop_stale_servers), the same
convention as the Ceph clusters. Servers are only ever signalled by their own PID, pinned to its start
time (ProcRef), and only ever matched by their own ``--data-dir``.

Without ``netns`` a server listens on free loopback ports (picked once, kept for the server's life:
a restart must find its peer URL again); inside a lab netns, which nobody else uses, on the standard
2379/2380. A client in the root namespace cannot reach the latter: use etcdctl(), which runs inside.
"""
from __future__ import annotations

import contextlib
import ipaddress
import itertools
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

from . import LAB_PREFIX, NETNS_DIR, NSENTER, ProcRef, end_processes, register_cleanup, sh, tail, wait_until

ETCD = "/usr/bin/etcd"
ETCDCTL = "/usr/bin/etcdctl"
CURL = "/usr/bin/curl"
_ids = itertools.count()
_live: list["EtcdServer"] = []
_ports_taken: set[int] = set()  # handed out in this process: a stopped server keeps its ports
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via an http_proxy
_STALE_DATA = re.compile(r"/nplab-(\d+)-etcd-\d+/data$")

# Small and quick on a 2-core box. A single member never loses its leadership, so short raft timers
# cost nothing and make a restart ready in ~0.4 s instead of ~1.3 s; a snapshot every 1000 entries keeps
# the in-memory raft log small; a 64 MiB quota makes a runaway test hit NOSPACE instead of the disk.
# No auth, no v2 API, no pprof (all off by default in 3.4).
TUNING = ("--heartbeat-interval=50", "--election-timeout=250", "--snapshot-count=1000",
          f"--quota-backend-bytes={64 << 20}", "--max-snapshots=2", "--max-wals=2")


def skip_reason() -> str | None:
    """Why a lab etcd can't run here, or None."""
    if os.geteuid() != 0:
        return "the etcd lab needs root (network namespaces, signalling its own daemons)"
    for path in (ETCD, ETCDCTL):
        if not os.access(path, os.X_OK):
            return f"{path} is missing (bash scripts/setup installs etcd-server etcd-client)"
    return None


def _free_ports(address: str, count: int) -> list[int]:
    """``count`` TCP ports free on the loopback ``address``, below the ephemeral range (32768+): an
    outgoing connection must never take a stopped server's port before it restarts."""
    free: list[int] = []
    for port in random.SystemRandom().sample(range(20000, 32768), 500):
        if port in _ports_taken:
            continue
        with socket.socket() as s, contextlib.suppress(OSError):
            s.bind((address, port))
            free.append(port)
        if len(free) == count:
            _ports_taken.update(free)
            return free
    raise RuntimeError(f"found no free TCP ports on {address} for etcd")


class EtcdServer:
    """One etcd member in ``netns`` (None: the root namespace, loopback ports only).
    ``start()`` it; ``destroy()`` stops it and removes its directory."""

    def __init__(self, workdir: Path, *, netns: str | None = None, address: str = "127.0.0.1",
                 name: str | None = None):
        if netns is None and not ipaddress.IPv4Address(address).is_loopback:
            raise ValueError("outside a lab netns an etcd listens on the loopback only")
        if netns is not None and not netns.startswith(LAB_PREFIX):
            raise ValueError(f"netns {netns!r} was not created by this lab")
        self.netns = netns
        self.address = address
        self.dir = Path(workdir) / f"{LAB_PREFIX}etcd-{next(_ids)}"
        self.name = name or self.dir.name
        self.data_dir = self.dir / "data"
        self.log = self.dir / "etcd.log"
        # in a lab netns nothing else listens: the standard ports
        self.client_port, self.peer_port = (2379, 2380) if netns else _free_ports(address, 2)
        self.proc: subprocess.Popen | None = None
        self.ref: ProcRef | None = None
        self.paused = False
        self.start_seconds: float | None = None  # how long the last start() took (to /health true)
        self.dir.mkdir(parents=True, exist_ok=False)
        _live.append(self)

    @property
    def url(self) -> str:
        return f"http://{self.address}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.address}:{self.peer_port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def argv(self) -> list[str]:
        prefix = [NSENTER, f"--net={NETNS_DIR}/{self.netns}"] if self.netns else []
        return [*prefix, ETCD, f"--name={self.name}", f"--data-dir={self.data_dir}",
                f"--listen-client-urls={self.url}", f"--advertise-client-urls={self.url}",
                f"--listen-peer-urls={self.peer_url}", f"--initial-advertise-peer-urls={self.peer_url}",
                f"--initial-cluster={self.name}={self.peer_url}", "--initial-cluster-state=new",
                "--logger=zap", "--log-outputs=stderr", *TUNING]

    # -- lifecycle --
    def start(self, timeout: float = 30.0) -> "EtcdServer":
        """Start (or, with an existing data dir, restart) and wait until /health says true."""
        if self.alive():
            raise RuntimeError(f"etcd {self.pid} is already running")
        t0 = time.monotonic()
        with open(self.log, "ab") as logf:
            logf.write(f"\n=== lab: starting etcd at {time.strftime('%T')} ===\n".encode())
            logf.flush()
            # nsenter only switches the netns and execs etcd: Popen.pid is etcd's PID. Own session:
            # a Ctrl-C in the terminal reaches pytest, which then stops etcd in order.
            env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}
            self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=logf,
                                         stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.ref = ProcRef(self.proc.pid)
        self.paused = False
        try:
            wait_until(self._ready, timeout, f"etcd {self.name} to report health at {self.url}")
        except Exception as exc:
            msg = f"etcd failed to start: {exc}\n--- etcd log ---\n{self.log_tail(30)}"
            self.kill()
            raise RuntimeError(msg) from None
        self.start_seconds = time.monotonic() - t0
        return self

    def _ready(self) -> bool:
        """Healthy, and it is ours: a member of that name answers (not some other etcd that holds
        the port while ours is exiting with "address already in use")."""
        if self.proc.poll() is not None:
            raise RuntimeError(f"etcd exited with {self.proc.returncode}")
        try:
            if json.loads(self.http("/health", timeout=1)).get("health") != "true":
                return False
            members = json.loads(self.http("/v3/cluster/member/list", {}, timeout=1))["members"]
        except (OSError, ValueError, KeyError, subprocess.SubprocessError):
            return False
        return any(m.get("name") == self.name for m in members)

    def http(self, path: str, body: dict | None = None, timeout: float = 5.0) -> str:
        """GET ``url + path`` (POST ``body`` as JSON if given) from the server's namespace, with curl
        inside a netns; the response body. Raises OSError/SubprocessError if it doesn't answer."""
        data = None if body is None else json.dumps(body).encode()
        if self.netns is None:
            with _NO_PROXY.open(self.url + path, data=data, timeout=timeout) as resp:
                return resp.read().decode()
        post = [] if data is None else ["-H", "Content-Type: application/json", "-d", data.decode()]
        argv = [CURL, "-sSf", "--noproxy", "*", "-m", timeout, *post, self.url + path]
        return sh(argv, netns=self.netns, timeout=timeout + 5).stdout

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _signal(self, sig: int) -> None:
        if self.alive() and self.ref is not None:
            self.ref.signal(sig)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (a clean shutdown: everything acknowledged is on disk), SIGKILL after ``timeout``.
        Also works on a paused server: the SIGCONT after the SIGTERM lets it act on it."""
        if self.proc is None:
            return
        self._signal(signal.SIGTERM)
        self._signal(signal.SIGCONT)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)
            self.proc.wait(10)
        self.paused = False

    def kill(self) -> None:
        """SIGKILL, as in a crash (or an OOM kill); start() recovers from the WAL."""
        if self.proc is not None:
            self._signal(signal.SIGKILL)
            self.proc.wait(10)
        self.paused = False

    def pause(self) -> None:
        """SIGSTOP: "etcd temporarily unreachable". Connections are accepted by the kernel (the
        listen backlog) but never answered, so clients see timeouts, not refusals; nothing is lost."""
        if not self.alive():
            raise RuntimeError(f"etcd {self.name} is not running")
        self._signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        """SIGCONT after pause(); a no-op when not paused or not running."""
        self._signal(signal.SIGCONT)
        self.paused = False

    def restart(self, timeout: float = 30.0) -> "EtcdServer":
        """stop() and start() on the same data dir and ports."""
        self.stop()
        return self.start(timeout)

    def destroy(self) -> None:
        """Stop (SIGKILL what ignores that) and remove this server's own directory. Safe twice."""
        try:
            self.stop()
        finally:
            end_processes(servers_of(self.data_dir))  # e.g. a start() that lost its Popen
            if self in _live:
                _live.remove(self)
        if not self.dir.name.startswith(LAB_PREFIX + "etcd-"):
            raise RuntimeError(f"refusing to remove {self.dir}: not a lab directory")
        shutil.rmtree(self.dir, ignore_errors=True)
        if self.dir.exists():
            raise RuntimeError(f"could not remove {self.dir}")
        if self.netns is None:
            _ports_taken.difference_update((self.client_port, self.peer_port))

    # -- inspection --
    def etcdctl(self, *args, check: bool = True, timeout: float = 15.0) -> subprocess.CompletedProcess:
        """``etcdctl --endpoints URL *args`` (v3 API) from the server's namespace."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCDCTL")}
        env["ETCDCTL_API"] = "3"
        return sh([ETCDCTL, f"--endpoints={self.url}", "--command-timeout=5s", *args],
                  netns=self.netns, check=check, timeout=timeout, env=env)

    def log_tail(self, lines: int = 60) -> str:
        return tail(self.log, lines)

    def __repr__(self) -> str:
        return f"EtcdServer({self.name}, {self.url}, netns={self.netns}, pid={self.pid})"


def _etcd_processes() -> list[tuple[int, list[str]]]:
    """(pid, argv) of every etcd on the host (nsenter has exec'd it by the time it listens)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().decode(errors="replace").split("\0")
            if argv[0] == ETCD:
                found.append((int(pid), argv))
    return found


def servers_of(data_dir: Path) -> list[ProcRef]:
    """Live etcd processes started with ``--data-dir=data_dir``."""
    flag = f"--data-dir={data_dir}"
    return [ProcRef(pid) for pid, argv in _etcd_processes() if flag in argv]


def stale_servers() -> dict[str, list[ProcRef]]:
    """Lab etcds whose test process is gone (a killed run), by data dir."""
    stale: dict[str, list[ProcRef]] = {}
    for pid, argv in _etcd_processes():
        for arg in (a for a in argv if a.startswith("--data-dir=")):
            match = _STALE_DATA.search(arg)
            if match and not os.path.exists(f"/proc/{match.group(1)}"):
                stale.setdefault(arg.split("=", 1)[1], []).append(ProcRef(pid))
    return stale


def stop_stale_servers() -> list[str]:
    """End what stale_servers() finds (by hand: python -c 'import tests.lab.etcd as e;
    print(e.stop_stale_servers())'); returns their data dirs (left in place)."""
    stale = stale_servers()
    for refs in stale.values():
        for ref in refs:
            ref.signal(signal.SIGCONT)  # a paused one would sit on the SIGTERM until the SIGKILL
        end_processes(refs, timeout=10)
    return sorted(stale)


def stop_all_servers() -> None:
    """Last resort (session end, atexit): stop and remove every server this process created."""
    errors = []
    for server in list(_live):
        try:
            server.destroy()
        except Exception as exc:  # noqa: BLE001 - keep going
            errors.append(str(exc))
    if errors:
        raise RuntimeError("; ".join(errors))


# After plugins (0: netplugin is an etcd client) and with the dockerds (1), before the network
# namespaces (2): an etcd still running inside a removed netns would keep it alive, unreachable.
register_cleanup(1, stop_all_servers)

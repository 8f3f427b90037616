"""A real dockerd (Debian's docker.io 20.10) running inside one of the lab's network namespaces.

Started with ``nsenter --net`` (``ip netns exec`` would remount /sys and dockerd then fails with
"Devices cgroup isn't mounted"), with every path of its own under a temp dir D:
``--data-root D/data --exec-root D/exec -H unix://D/docker.sock --pidfile D/docker.pid``.
Docker's iptables rules (FORWARD policy DROP) therefore only exist in that netns. ``netns=None``
(the initial namespace) is refused outside the VM lane's throwaway guest.
"""
from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from . import (DOCKER, DOCKERD, LAB_PREFIX, NETNS_DIR, NSENTER, PLUGIN_DIR, ProcRef, descendants,
               end_processes, http_unix, in_vm_lane, pids_with_arg, register_cleanup, remove_tree, sh,
               stop_popen, tail, wait_until)
from .image import IMAGE

BUILTIN_NETWORKS = {"none", "host", "bridge"}
BUILTIN_DRIVERS = {"null", "host", "bridge", "macvlan", "ipvlan", "overlay"}
_live: list["Dockerd"] = []


class Dockerd:
    """One dockerd in netns ``netns``. ``docker(...)`` runs the CLI against it."""

    def __init__(self, netns: str | None, *, log_path: Path | None = None, log_level: str = "info",
                 extra_args: tuple[str, ...] = (), live_restore: bool = True):
        if netns is None and not in_vm_lane():
            raise RuntimeError("a lab dockerd runs in a lab netns; the initial namespace only in the VM lane")
        self.netns = netns
        self.log_level = log_level
        self.extra_args = list(extra_args)
        self.live_restore = live_restore  # swarm mode refuses to start with --live-restore
        self.proc: subprocess.Popen | None = None
        self.dirty = False  # set by fixtures when docker's state can't be cleaned: recreate()
        self.image_tar: Path | None = None
        self.root = self._new_root()
        self.log = Path(log_path) if log_path else self.root / "dockerd.log"
        _live.append(self)

    @staticmethod
    def _new_root() -> Path:
        root = Path(tempfile.mkdtemp(prefix=LAB_PREFIX + "d-", dir="/tmp"))
        (root / "daemon.json").write_text("{}\n")  # ignore any /etc/docker/daemon.json
        return root

    @property
    def sock(self) -> Path:
        return self.root / "docker.sock"

    @property
    def host(self) -> str:
        return f"unix://{self.sock}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def argv(self) -> list[str]:
        r = self.root
        prefix = [NSENTER, f"--net={NETNS_DIR}/{self.netns}"] if self.netns else []
        return [*prefix, DOCKERD,
                "--config-file", str(r / "daemon.json"), "--bridge=none",
                "--data-root", str(r / "data"), "--exec-root", str(r / "exec"),
                "-H", self.host, "--pidfile", str(r / "docker.pid"),
                *(["--live-restore"] if self.live_restore else []), f"--log-level={self.log_level}", *self.extra_args]

    # -- lifecycle --
    def start(self, timeout: float = 30.0) -> "Dockerd":
        if self.alive():
            raise RuntimeError(f"dockerd {self.pid} is already running")
        self._drop_dead_containerd_pidfile()
        with open(self.log, "ab") as logf:
            logf.write(f"\n=== lab: starting dockerd at {time.strftime('%T')} ===\n".encode())
            logf.flush()
            env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}
            # nsenter only switches the netns and execs dockerd: Popen.pid is dockerd's PID.
            self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=logf,
                                         stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        try:
            wait_until(self._ready, timeout, f"dockerd in {self.netns or 'the initial netns'} to answer /_ping")
        except Exception as exc:
            msg = f"dockerd failed to start: {exc}\n--- dockerd log ---\n{self.log_tail(30)}"
            self.stop(kill_leftovers=True)
            raise RuntimeError(msg) from None
        return self

    def _drop_dead_containerd_pidfile(self) -> None:
        """After dockerd was SIGKILLed its containerd dies too (pdeathsig) but may linger as a
        zombie (this VM's init reaps orphans slowly); dockerd would take the zombie's PID for a
        live containerd and time out dialing it. Without the pidfile it starts a new one, which
        picks up the running shims (--live-restore)."""
        pidfile = self.root / "exec" / "containerd" / "containerd.pid"
        try:
            pid = int(pidfile.read_text().strip())
        except (FileNotFoundError, ValueError):
            return
        # Right after a SIGKILL of dockerd its containerd may still be on its way out (pdeathsig):
        # dockerd would dial it and time out (seen once in 143 operations of the dockerd torture).
        containerd, deadline = ProcRef(pid), time.monotonic() + 15
        while containerd.alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        if not containerd.alive():
            pidfile.unlink(missing_ok=True)

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"dockerd exited with {self.proc.returncode}")
        try:
            return http_unix(self.sock, "GET", "/_ping", timeout=2)[0] == 200
        except OSError:
            return False

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal dockerd alone, as in a crash. On SIGKILL its containerd dies too (pdeathsig);
        container shims live on and start() picks them up again."""
        if self.alive():
            self.proc.send_signal(sig)
            if sig in (signal.SIGKILL, signal.SIGTERM):
                self.proc.wait(30)

    def stop(self, timeout: float = 20.0, *, kill_leftovers: bool = False) -> None:
        """SIGTERM dockerd, SIGKILL after ``timeout``. With ``kill_leftovers`` also end its
        containerd, shims and container processes (everything naming our root dir)."""
        if self.proc is not None:
            stop_popen(self.proc, timeout)
        if kill_leftovers:
            self._end_leftovers()

    def restart(self, timeout: float = 30.0) -> "Dockerd":
        """Stop (containers survive: --live-restore) and start again on the same dirs."""
        self.stop()
        return self.start(timeout)

    def _end_leftovers(self) -> None:
        refs = pids_with_arg(str(self.root) + "/")  # containerd, shims (-address D/exec/...)
        tree = [d for r in refs for d in descendants(r.pid)]  # container processes
        left = end_processes(refs + tree)
        if left:
            raise RuntimeError(f"processes of {self.root} survived SIGKILL: {left}")

    def destroy(self) -> None:
        """Remove all containers, stop dockerd and everything it started, unmount and delete D.
        Safe after a partial start and when called twice."""
        errors = []
        if self.alive():
            try:
                self.remove_all_containers(timeout=60)
            except Exception as exc:  # noqa: BLE001 - keep tearing down
                errors.append(f"rm -f containers: {exc}")
        try:
            self.stop(kill_leftovers=True)
        except Exception as exc:  # noqa: BLE001
            errors.append(str(exc))
        self._remove_root()
        if self in _live:
            _live.remove(self)
        if errors:
            raise RuntimeError("dockerd teardown: " + "; ".join(errors))

    def _remove_root(self) -> None:
        root = self.root
        if root.parent != Path("/tmp") or not root.name.startswith(LAB_PREFIX):
            raise RuntimeError(f"refusing to remove {root}: not a lab directory")
        keep_log = self.log.is_relative_to(root)
        remove_tree(root)
        if root.exists():
            raise RuntimeError(f"could not remove {root}")
        if keep_log:
            self.log = Path(os.devnull)

    def recreate(self, timeout: float = 30.0) -> "Dockerd":
        """Throw this daemon's state away and start a fresh one (same netns, same log file)."""
        self.destroy()
        own_log = self.log == Path(os.devnull)
        self.root = self._new_root()
        if own_log:
            self.log = self.root / "dockerd.log"
        self.dirty = False
        _live.append(self)
        self.start(timeout)
        if self.image_tar is not None:
            self.import_image(self.image_tar)
        return self

    # -- CLI --
    def docker(self, *args, check: bool = True, timeout: float = 60.0,
               input: str | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """``/usr/bin/docker -H unix://D/docker.sock *args``; text CompletedProcess. ``env``: extra
        variables (``docker stack deploy`` substitutes them into the file)."""
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}, **(env or {})}
        env["DOCKER_CONFIG"] = str(self.root / "client")  # never read/write ~/.docker
        return sh([DOCKER, "-H", self.host, *args], check=check, timeout=timeout,
                  input=input, env=env)

    def import_image(self, tar: Path, tag: str = IMAGE) -> str:
        self.docker("import", "--change", 'CMD ["/bin/sh"]', str(tar), tag)
        self.image_tar = Path(tar)
        return tag

    def containers(self) -> list[str]:
        return self.docker("ps", "-aq", "--no-trunc").stdout.split()

    def remove_all_containers(self, timeout: float = 60.0) -> None:
        ids = self.containers()
        if ids:
            self.docker("rm", "-f", *ids, timeout=timeout)

    def networks(self) -> list[dict]:
        """User networks: [{id, name, driver}] (none/host/bridge left out)."""
        out = self.docker("network", "ls", "--no-trunc",
                          "--format", "{{.ID}}\t{{.Name}}\t{{.Driver}}").stdout
        nets = [dict(zip(("id", "name", "driver"), line.split("\t")))
                for line in out.splitlines() if line.strip()]
        return [n for n in nets if n["name"] not in BUILTIN_NETWORKS]

    def remove_networks(self, driver: str | None = None, timeout: float = 60.0) -> None:
        for net in self.networks():
            if driver is None or net["driver"] == driver:
                self.docker("network", "rm", net["id"], timeout=timeout)

    def reset(self) -> None:
        """Between tests: make sure dockerd runs with no containers and no user networks.
        Falls back to recreate() when the state can't be cleaned (e.g. a network whose plugin
        is gone: dockerd would retry the plugin for ~30 s per call)."""
        if self.dirty:
            self.recreate()
            return
        if not self.alive():
            self.start()
        try:
            nets = self.networks()
            if any(not _driver_alive(n["driver"]) for n in nets):
                raise RuntimeError("a network's driver is gone")
            self.remove_all_containers(timeout=30)
            self.remove_networks(timeout=30)
        except Exception:  # noqa: BLE001 - a fresh daemon is the reliable answer
            self.recreate()

    def log_tail(self, lines: int = 80) -> str:
        return tail(self.log, lines)


def _driver_alive(driver: str) -> bool:
    """True for built-in drivers and for plugins whose socket accepts a connection."""
    if driver in BUILTIN_DRIVERS:
        return True
    sock = Path(PLUGIN_DIR) / f"{driver}.sock"
    try:
        http_unix(sock, "POST", "/Plugin.Activate", b"", timeout=2)
        return True
    except OSError:
        return False


def destroy_all_dockerds() -> None:
    """Last-resort cleanup (cleanup_all: session end, atexit)."""
    errors = []
    for d in list(_live):
        try:
            d.destroy()
        except Exception as exc:  # noqa: BLE001
            errors.append(str(exc))
    if errors:
        raise RuntimeError("; ".join(errors))


register_cleanup(1, destroy_all_dockerds)

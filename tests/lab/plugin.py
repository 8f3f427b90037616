"""The plugin under test as a real process in the Docker host's netns.

Started as ``nsenter --net=/run/netns/<ns> python -m netplugin serve --socket
/run/docker/plugins/<name>.sock --state-dir <dir> --log-level debug``. dockerd only discovers
legacy plugins in /run/docker/plugins (shared by every dockerd on the machine), so each instance
gets a unique name ``nptest<6 hex>``; that name is also the Docker driver name.

The process runs in its own session: ``kill(sig)`` signals the whole process group (gunicorn
master and workers at once, as systemd would); ``kill(sig, group=False)`` only the master.
"""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from . import (LAB_PREFIX, NETNS_DIR, NSENTER, PLUGIN_DIR, REPO_ROOT, group_alive,
               plugin_post, register_cleanup, tail, wait_until)

_live: list["Plugin"] = []


class PluginError(RuntimeError):
    pass


class Plugin:
    """One plugin instance. ``call(endpoint, body)`` talks to it like dockerd does."""

    def __init__(self, netns: str | None, workdir: Path, *, name: str | None = None,
                 command: list[str] | None = None, extra_args: tuple[str, ...] = (),
                 docker_host: str | None = None, env: dict | None = None):
        self.netns = netns
        self.name = name or f"nptest{secrets.token_hex(3)}"
        self.socket = Path(PLUGIN_DIR) / f"{self.name}.sock"
        self.workdir = Path(workdir)
        self.state_dir = self.workdir / "state"
        self.log = self.workdir / "plugin.log"
        self.command = command or [sys.executable, "-m", "netplugin"]
        self.extra_args = list(extra_args)
        # netplugin's label watcher follows a dockerd's events: only ever the lab's own (docker_host);
        # without one it is switched off, so a test plugin never talks to a dockerd the lab did not start.
        self.docker_host = docker_host
        self.env = env or {}  # extra environment (configuration) of every start
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self.state_dir.mkdir(parents=True, exist_ok=True)
        _live.append(self)

    def argv(self) -> list[str]:
        # netns None: the root namespace (the volume plugin needs dockerd's mount namespace, and the
        # test Ceph cluster listens on the root namespace's loopback).
        prefix = [NSENTER, f"--net={NETNS_DIR}/{self.netns}"] if self.netns else []
        return [*prefix, *self.command, "serve",
                "--socket", str(self.socket), "--state-dir", str(self.state_dir),
                "--log-level", "debug", *self.extra_args]

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- lifecycle --
    def start(self, timeout: float = 20.0) -> "Plugin":
        """Start and wait until ``POST /Plugin.Activate`` answers 200. A stale socket left by
        a killed instance is NOT removed here: replacing it is the plugin's job."""
        if self.alive():
            raise PluginError(f"plugin {self.name} is already running (pid {self.pid})")
        self.starts += 1
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                          env.get("PYTHONPATH")]))
        env["PYTHONUNBUFFERED"] = "1"
        if self.docker_host:
            env["NETPLUGIN_DOCKER_HOST"] = self.docker_host
        else:  # never act on a dockerd the lab did not start: no label watcher, no garbage collection
            env["NETPLUGIN_LABELS"] = "0"
            env["NETPLUGIN_GC_INTERVAL"] = "0"
            env["VOLPLUGIN_GC_INTERVAL"] = "0"
        env.update(self.env)
        with open(self.log, "ab") as logf:
            logf.write(f"\n=== lab: start #{self.starts} of {self.name} at "
                       f"{time.strftime('%T')}: {' '.join(self.argv())} ===\n".encode())
            logf.flush()
            self.proc = subprocess.Popen(self.argv(), cwd=REPO_ROOT, env=env,
                                         stdin=subprocess.DEVNULL, stdout=logf,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_until(self._ready, timeout, f"plugin {self.name} to answer Plugin.Activate")
        except Exception as exc:
            msg = f"plugin failed to start: {exc}\n--- plugin log ---\n{self.log_tail(30)}"
            self.stop(timeout=5)
            raise PluginError(msg) from None
        return self

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise PluginError(f"plugin exited with {self.proc.returncode}")
        try:
            status, reply = plugin_post(self.socket, "/Plugin.Activate", None, timeout=2)
        except OSError:
            return False
        if status != 200:
            raise PluginError(f"Plugin.Activate answered {status}: {reply}")
        return True

    def kill(self, sig: int = signal.SIGKILL, *, group: bool = True, wait: bool = True) -> None:
        """Send ``sig`` to the plugin's process group (or only its main process). For
        SIGKILL/SIGTERM with ``wait``, return once every process of the group is gone."""
        if self.proc is None:
            return
        pgid = self.proc.pid  # start_new_session: the group is ours alone
        try:
            if group:
                os.killpg(pgid, sig)
            elif self.proc.poll() is None:
                self.proc.send_signal(sig)
        except ProcessLookupError:
            pass
        if wait and sig in (signal.SIGKILL, signal.SIGTERM):
            self.proc.wait(30)
            if group:
                wait_until(lambda: not group_alive(pgid), 30, f"plugin group {pgid} to exit")

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the main process, wait ``timeout``, then SIGKILL the whole group; returns
        once no process of the group is left. Idempotent."""
        if self.proc is None:
            return
        pgid = self.proc.pid
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        if self.proc.poll() is None or group_alive(pgid):
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)
            wait_until(lambda: not group_alive(pgid), 10, f"plugin group {pgid} to die")

    def restart(self, timeout: float = 20.0) -> "Plugin":
        self.stop()
        return self.start(timeout)

    def destroy(self, *, keep_workdir: bool = True) -> None:
        """Stop, remove our socket, and (optionally) the work dir with state and log."""
        try:
            self.stop()
        finally:
            try:
                self.socket.unlink()
            except FileNotFoundError:
                pass
            if not keep_workdir and LAB_PREFIX in str(self.workdir):
                shutil.rmtree(self.workdir, ignore_errors=True)
            if self in _live:
                _live.remove(self)

    # -- talking to it --
    def request(self, endpoint: str, body=None, timeout: float = 30.0) -> tuple[int, dict]:
        """POST ``body`` (JSON; None = empty, like Activate) -> (HTTP status, reply dict)."""
        return plugin_post(self.socket, endpoint, body, timeout)

    def call(self, endpoint: str, body=None, timeout: float = 30.0) -> dict:
        """POST and return the reply dict (error replies included: check ``reply.get("Err")``)."""
        return self.request(endpoint, body, timeout)[1]

    def state_rows(self, sql: str) -> list[tuple]:
        """Query the plugin's SQLite state directly (SELECTs only; ``status`` would cost a Python
        start-up, seconds in the VM lane)."""
        own = "volplugin.db" if (self.state_dir / "volplugin.db").exists() else "netplugin.db"
        db = sqlite3.connect(self.state_dir / own, timeout=10)
        try:
            return db.execute(sql).fetchall()
        finally:
            db.close()

    def log_tail(self, lines: int = 80) -> str:
        return tail(self.log, lines)


def rbd_volplugin(workdir: Path, ceph, *, prefix: str = "vptest", op_timeout: float = 15.0) -> Plugin:
    """volplugin (not started) serving a unique driver name on the test Ceph ``ceph`` as host "hostA",
    in the root netns (dockerd's mount namespace; the cluster listens on its loopback). ``.config``: its TOML."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "volplugin.toml"
    config.write_text(f'host_id = "hostA"\n[rbd]\nconf = "{ceph.conf_path}"\npool = "{ceph.pool}"\n'
                      'fence_grace = 2.0\nconnect_timeout = 5.0\n'
                      f'op_timeout = {op_timeout}\n')
    plugin = Plugin(None, workdir / "volplugin", name=f"{prefix}{secrets.token_hex(3)}",
                    command=[sys.executable, "-m", "volplugin"], extra_args=("--config", str(config)))
    plugin.config = config
    return plugin


def destroy_all_plugins() -> None:
    errors = []
    for p in list(_live):
        try:
            p.destroy()
        except Exception as exc:  # noqa: BLE001
            errors.append(f"{p.name}: {exc}")
    if errors:
        raise RuntimeError("; ".join(errors))


register_cleanup(0, destroy_all_plugins)

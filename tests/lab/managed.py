"""Managed (v2) plugins in a lab dockerd: the plugin directories scripts/build-managed-plugins makes
(its cache makes a rebuild take seconds), ``docker plugin create/enable/set/disable/upgrade/rm``
through the lab dockerd's CLI, and a throwaway registry (Debian's docker-registry) for
``docker plugin push`` / ``upgrade``, which only ever fetch from a registry.

Docker 20.10 puts every managed plugin's runtime directory at /run/docker/plugins/<plugin id>/ on
the host whatever its --exec-root (the plugin sees it as /run/docker/plugins): the socket is there.
Plugin IDs are random, so lab daemons never collide; the directories of plugins a killed dockerd
left behind are removed by ``ManagedPlugin.forget``.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

from . import (LAB_PREFIX, NETNS_DIR, NSENTER, PLUGIN_DIR, REPO_ROOT, BUSYBOX, plugin_post,
               register_cleanup, remove_tree, sh, stop_popen, tail, wait_until)

BUILD_SCRIPT = REPO_ROOT / "scripts" / "build-managed-plugins"
REGISTRY = "/usr/bin/docker-registry"
CTR = "/usr/bin/ctr"
_live_registries: list["Registry"] = []


def build_skip_reason() -> str | None:
    """Why the plugin directories cannot be built here, or None."""
    if os.geteuid() != 0:
        return "building managed plugins needs root (debootstrap, chroot)"
    if shutil.which("debootstrap") is None:
        return "debootstrap is not installed (bash scripts/setup installs it)"
    return None


def build_plugins(out: Path, *services: str, label: str | None = None, timeout: float = 1800) -> dict:
    """Run scripts/build-managed-plugins into ``out``; returns {service: plugin dir} and the build's
    wall time in seconds under "seconds". Raises with the script's output tail on failure."""
    argv = ["bash", str(BUILD_SCRIPT), "--out", str(out), *(["--label", label] if label else []), *services]
    start = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} -> exit {proc.returncode}\n{proc.stderr[-4000:]}")
    dirs = {s: Path(out) / s for s in (services or ("netplugin", "volplugin"))}
    return {**dirs, "seconds": time.monotonic() - start, "log": proc.stderr}


class ManagedPlugin:
    """One managed plugin in ``dockerd`` (a tests.lab.dockerd.Dockerd), named ``name`` (a reference:
    ``name[:tag]``, ``127.0.0.1:5000/repo:tag`` for one that gets pushed)."""

    def __init__(self, dockerd, name: str):
        self.dockerd = dockerd
        self.name = name
        self.id: str | None = None

    def docker(self, *args, **kw):
        return self.dockerd.docker("plugin", *args, **kw)

    # -- lifecycle --
    def create(self, plugin_dir: Path, timeout: float = 300) -> "ManagedPlugin":
        self.docker("create", self.name, str(plugin_dir), timeout=timeout)
        self.id = self.inspect()["Id"]
        return self

    def enable(self, timeout: int = 60) -> None:
        self.docker("enable", "--timeout", str(timeout), self.name, timeout=timeout + 30)

    def disable(self, force: bool = False) -> None:
        self.docker("disable", *(["-f"] if force else []), self.name, timeout=60)

    def set(self, *pairs: str) -> None:
        self.docker("set", self.name, *pairs)

    def rm(self, force: bool = False) -> None:
        self.docker("rm", *(["-f"] if force else []), self.name, timeout=120)
        self.forget()

    def push(self) -> None:
        self.docker("push", self.name, timeout=600)

    def upgrade(self, remote: str) -> subprocess.CompletedProcess:
        return self.docker("upgrade", "--grant-all-permissions", "--skip-remote-check", self.name, remote,
                           timeout=600)

    def forget(self) -> None:
        """Remove the plugin's runtime directory on the host if dockerd left it (it was killed)."""
        if self.id and len(self.id) == 64:
            run_dir = Path(PLUGIN_DIR) / self.id
            if run_dir.is_dir():
                remove_tree(run_dir)

    # -- facts --
    def inspect(self) -> dict:
        return json.loads(self.docker("inspect", self.name).stdout)[0]

    @property
    def enabled(self) -> bool:
        return self.inspect()["Enabled"]

    @property
    def socket(self) -> Path:
        config = self.inspect()["Config"]
        return Path(PLUGIN_DIR) / self.id / config["Interface"]["Socket"]

    def wait_serving(self, timeout: float = 120.0) -> float:
        """Wait until Plugin.Activate is answered (``enable`` returns once the socket listens; the
        plugin may still be reconciling or starting its embedded cluster). Returns the seconds waited."""
        started = time.monotonic()

        def answers() -> bool:
            try:
                return plugin_post(self.socket, "/Plugin.Activate", None, timeout=timeout)[0] == 200
            except OSError:
                return False
        wait_until(answers, timeout, f"plugin {self.name} to answer Plugin.Activate", interval=0.2)
        return time.monotonic() - started

    def call(self, endpoint: str, body=None, timeout: float = 30.0) -> dict:
        return plugin_post(self.socket, endpoint, body, timeout)[1]

    def pid(self) -> int:
        """The plugin container's init process (host PID), from the lab dockerd's containerd."""
        out = sh([CTR, "--address", str(self.dockerd.root / "exec" / "containerd" / "containerd.sock"),
                  "--namespace", "plugins.moby", "tasks", "ls"], timeout=20).stdout
        for line in out.splitlines()[1:]:
            fields = line.split()
            if fields and fields[0] == self.id and fields[2] == "RUNNING":
                return int(fields[1])
        raise RuntimeError(f"plugin {self.name} ({self.id}) has no running task:\n{out}")

    def exec(self, *argv, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
        """Run ``argv`` inside the plugin container (all its namespaces) with the plugin's environment."""
        pid = self.pid()
        env = dict(line.split("=", 1) for line in
                   Path(f"/proc/{pid}/environ").read_bytes().decode().split("\0") if "=" in line)
        return sh([NSENTER, "-t", pid, "-m", "-u", "-i", "-n", "-p", "-r", "-w", *argv], timeout=timeout,
                  check=check, env=env)

    def log_tail(self, lines: int = 60) -> str:
        """The plugin's output (dockerd logs it with plugin=<id>)."""
        return "\n".join(ln for ln in tail(self.dockerd.log, 2000, width=400).splitlines()
                         if self.id and self.id in ln)[-12000:]


class Registry:
    """Debian's docker-registry (distribution 2.8) on 127.0.0.1:<port> inside lab netns ``netns``,
    storing into ``workdir``: what ``docker plugin push`` and ``upgrade`` talk to. No auth, no TLS
    (Docker treats 127.0.0.0/8 registries as insecure by default)."""

    def __init__(self, netns: str, workdir: Path, port: int = 5000):
        self.netns = netns
        self.workdir = Path(workdir)
        self.port = port
        self.address = f"127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None
        self.log = self.workdir / "registry.log"
        _live_registries.append(self)

    @staticmethod
    def skip_reason() -> str | None:
        if not os.access(REGISTRY, os.X_OK):
            return f"{REGISTRY} is missing (bash scripts/setup installs docker-registry)"
        return None

    def start(self, timeout: float = 20) -> "Registry":
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "config.yml"
        config.write_text(
            "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\n"
            f"storage:\n  filesystem:\n    rootdirectory: {self.workdir / 'data'}\n  delete:\n    enabled: true\n"
            f"http:\n  addr: {self.address}\n")
        with open(self.log, "ab") as logf:
            self.proc = subprocess.Popen([NSENTER, f"--net={NETNS_DIR}/{self.netns}", REGISTRY, "serve",
                                          str(config)], stdin=subprocess.DEVNULL, stdout=logf,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        url = f"http://{self.address}/v2/"
        try:
            wait_until(lambda: self._answers(url), timeout, f"the registry at {url}", interval=0.2)
        except Exception:
            self.stop()
            raise RuntimeError(f"registry did not start:\n{tail(self.log, 20)}") from None
        return self

    def _answers(self, url: str) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"docker-registry exited with {self.proc.returncode}")
        return sh([BUSYBOX, "wget", "-q", "-O", "/dev/null", url], netns=self.netns, check=False,
                  timeout=10).returncode == 0

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            stop_popen(self.proc, 10)

    def destroy(self) -> None:
        try:
            self.stop()
        finally:
            if LAB_PREFIX in str(self.workdir) or "pytest-" in str(self.workdir):
                shutil.rmtree(self.workdir / "data", ignore_errors=True)
            if self in _live_registries:
                _live_registries.remove(self)


def destroy_all_registries() -> None:
    for r in list(_live_registries):
        r.destroy()


register_cleanup(0, destroy_all_registries)

"""A single-node swarm on a lab dockerd: ``docker swarm init`` bound to an address that exists only in
the lab's netns, and waits for services and tasks through the real CLI.

Swarm refuses to start with ``--live-restore``: make the daemon with ``Dockerd(..., live_restore=False)``.
The manager listens on 192.0.2.10 (TEST-NET-1) on a veth pair inside the Docker host's netns (this kernel
has no dummy links): nothing of the swarm leaves the lab, and the emulated physical network (the parents
the plugins use) stays free of host addresses.
"""
from __future__ import annotations

import json
import sys
import time

from . import wait_until
from .dockerd import Dockerd

MANAGER_ADDRESS = "192.0.2.10"
MGMT_LINK = "swmgmt0"


class Swarm:
    def __init__(self, dockerd: Dockerd, lab, netns: str):
        if dockerd.live_restore:
            raise ValueError("swarm mode refuses --live-restore: use Dockerd(..., live_restore=False)")
        self.dockerd, self.lab, self.netns = dockerd, lab, netns

    def docker(self, *args, **kw):
        return self.dockerd.docker(*args, **kw)

    def init(self) -> "Swarm":
        self.lab.veth(self.netns, MGMT_LINK, self.netns, MGMT_LINK + "p")
        self.lab.addr(self.netns, MGMT_LINK, f"{MANAGER_ADDRESS}/32")
        self.docker("swarm", "init", "--advertise-addr", MANAGER_ADDRESS,
                    "--listen-addr", f"{MANAGER_ADDRESS}:2377", timeout=120)
        return self

    def leave(self) -> None:
        """Leave (and so dissolve) the swarm; a daemon that is not in one: nothing to do."""
        if self.dockerd.alive():
            self.docker("swarm", "leave", "--force", check=False, timeout=120)

    # -- waits --
    def node_plugins(self) -> set[tuple[str, str]]:
        out = self.docker("node", "inspect", "self", "--format", "{{json .Description.Engine.Plugins}}").stdout
        return {(p["Type"], p["Name"]) for p in json.loads(out)}

    def wait_node_plugins(self, wanted: set[tuple[str, str]], timeout: float = 90.0) -> float:
        """Wait until this node's description lists ``wanted`` ({(Type, Name)}): the scheduler places a
        task only on a node that reports its network and volume plugins, and the node refreshes its
        description every few seconds, not when a plugin is enabled (a service created before that
        stays "Pending: missing plugin on 1 node"). Returns the seconds waited."""
        return _wait(lambda: wanted <= self.node_plugins(), timeout,
                     lambda: f"node plugins {sorted(wanted - self.node_plugins())}")

    def tasks(self, service: str) -> list[dict]:
        out = self.docker("service", "ps", service, "--no-trunc", "--format", "{{json .}}").stdout
        return [json.loads(line) for line in out.splitlines()]

    def containers(self, service: str) -> list[str]:
        """IDs of the service's running containers on this node."""
        return self.docker("ps", "-q", "--no-trunc", "--filter", f"label=com.docker.swarm.service.name={service}",
                           "--filter", "status=running").stdout.split()

    def wait_running(self, service: str, count: int, timeout: float = 180.0) -> list[str]:
        """Wait until exactly ``count`` of the service's containers run and no task is being replaced."""
        def settled():
            running = self.containers(service)
            states = [t["CurrentState"].split()[0] for t in self.tasks(service) if t["DesiredState"] == "Running"]
            return len(running) == count and states == ["Running"] * count
        _wait(settled, timeout, lambda: f"{count} running tasks of {service}:\n{self.task_table(service)}")
        return self.containers(service)

    def wait_update(self, service: str, timeout: float = 240.0) -> None:
        def state():
            return self.docker("service", "inspect", service, "--format",
                               "{{if .UpdateStatus}}{{.UpdateStatus.State}}{{end}}").stdout.strip()
        _wait(lambda: state() == "completed", timeout,
              lambda: f"the update of {service} (state {state()!r}):\n{self.task_table(service)}")

    def wait_gone(self, service: str, timeout: float = 120.0) -> None:
        """After ``service rm``: wait until its containers are removed (the worker does it asynchronously)."""
        def gone():
            label = f"label=com.docker.swarm.service.name={service}"
            return not self.docker("ps", "-aq", "--filter", label).stdout.strip()
        _wait(gone, timeout, lambda: f"the containers of removed service {service}")

    def task_table(self, service: str) -> str:
        return self.docker("service", "ps", service, "--no-trunc", check=False).stdout


def teardown(daemon: Dockerd | None, swarm: Swarm | None, managed_plugins: list) -> None:
    """Whatever state a run left: remove services (waiting for their containers while the plugins still
    answer), volumes, the swarm and the managed plugins, then the daemon. Safe after a partial setup."""
    if daemon is not None and daemon.alive():
        services = daemon.docker("service", "ls", "-q", check=False).stdout.split()
        if services:
            daemon.docker("service", "rm", *services, check=False, timeout=120)
            for service in services:
                try:
                    swarm.wait_gone(service)
                except Exception as exc:  # noqa: BLE001 - keep tearing down
                    print(f"swarm teardown: {exc}", file=sys.stderr)
        for volume in daemon.docker("volume", "ls", "-q", check=False).stdout.split():
            daemon.docker("volume", "rm", "-f", volume, check=False, timeout=120)
        if swarm is not None:
            swarm.leave()
        for plugin in managed_plugins:
            if plugin.id:
                plugin.docker("rm", "-f", plugin.name, check=False, timeout=120)
    if daemon is not None:
        daemon.destroy()  # its containerd and the plugins' processes go with it
    for plugin in managed_plugins:
        plugin.forget()


def _wait(predicate, timeout: float, what) -> float:
    """wait_until with the message built only on a timeout (``what()`` asks the daemon for details)."""
    start = time.monotonic()
    try:
        wait_until(predicate, timeout, "it", interval=0.5)
    except TimeoutError:
        raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what()}") from None
    return time.monotonic() - start

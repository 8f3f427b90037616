"""Garbage collection against Docker's containers: volumes mounted here that no running container mounts.

A Mount whose reply a crash cut off leaves a mount ID Docker never learnt, so Docker never unmounts it:
the volume stays mounted and, on RBD, attached and owned by this host (no other host may mount it)
although no container uses it (found by the torture through dockerd, tests/e2e/test_torture_e2e.py).
Remove drops such IDs, but Docker sends Remove only at `docker volume rm`. Docker does not show its mount
IDs, but it shows which volumes its containers mount, and it unmounts a container's volumes when the
container stops: a volume with mount IDs here that no running, paused or restarting container mounts is
released (its IDs dropped, unmounted, detached) once a pass at least ``grace`` seconds after the first
that found it so still does. Never while a process in another mount namespace (a container starting,
one Docker does not list) has the filesystem mounted. Runs in one elected worker
(plugincore.background), never in a request handler: calling dockerd from there can deadlock it. Off
when ``gc_interval`` is 0 or ``docker_host`` is empty.
"""
from __future__ import annotations

import logging
import threading
import time

from plugincore.background import every_interval_with_docker
from plugincore.errors import Conflict

log = logging.getLogger("volplugin.gc")
MOUNTING = ("running", "paused", "restarting")  # container states whose volumes Docker keeps mounted


class VolumeGC:
    def __init__(self, driver, docker_host: str, interval: float = 60.0, grace: float = 120.0,
                 clock=time.monotonic):
        self.driver, self.docker_host = driver, docker_host
        self.interval, self.grace, self.clock = interval, grace, clock
        # volume -> (first pass that found it mounted for nobody, its mount IDs then): a Mount since (a
        # container starting) starts the grace over, and only the IDs seen then are ever released
        self.suspects: dict[str, tuple[float, frozenset]] = {}

    def sweep(self, in_use: set[str]) -> int:
        """One pass; ``in_use``: the volumes Docker's running containers mount. Returns how many volumes
        were released."""
        now, state = self.clock(), self.driver.state
        callers = {v["name"]: frozenset(state.callers(v["name"])) for v in state.volumes()}
        mounted = {a["volume"] for a in state.attachments()} | {name for name, ids in callers.items() if ids}
        suspects = {}
        for name in mounted - in_use:
            since, seen = self.suspects.get(name, (now, frozenset()))
            ids = callers.get(name, frozenset())
            suspects[name] = (since, seen) if ids <= seen and name in self.suspects else (now, ids)
        self.suspects = suspects
        released = 0
        for name, (since, seen) in sorted(self.suspects.items()):
            if now - since < self.grace:
                continue
            try:
                if self.driver.release_stale_mounts(name, seen, "no running container of Docker's mounts it"):
                    released += 1
            except Conflict as exc:  # a process in a container still has it: tried again next pass
                log.info("not releasing volume %s: %s", name, exc)
                continue
            except Exception:  # noqa: BLE001 - one volume must not stop the rest; tried again next pass
                log.exception("releasing volume %s failed", name)
                continue
            del self.suspects[name]
        return released

    @staticmethod
    def in_use(client) -> set[str]:
        """Names of the volumes Docker's running, paused or restarting containers mount (volume names are
        unique in a Docker daemon, whatever their driver)."""
        names = set()
        for container in client.api.containers(all=True, filters={"status": list(MOUNTING)}):
            names |= {m["Name"] for m in container.get("Mounts") or [] if m.get("Type") == "volume"}
        return names

    def run(self, stop: threading.Event) -> None:
        every_interval_with_docker(self.docker_host, self.interval, stop, self.one_pass)

    def one_pass(self, client) -> None:
        released = self.sweep(self.in_use(client))
        if released:
            log.info("garbage collection: released %d volume(s) no container mounts", released)

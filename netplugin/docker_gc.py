"""Garbage collection against Docker's own lists: what a crash leaves in the plugin that Docker can never
tell it about.

dockerd re-sends a request whose connection broke, but with an empty body (moby/moby#39331). The plugin
refuses the empty copy, and Docker then fails or finishes the operation without it. What the first,
cut-off copy did stays here (found by the torture through dockerd, tests/e2e/test_torture_e2e.py):
- a network whose CreateNetwork reply was cut: Docker forgot the network, the plugin keeps it, and with it
  its parent NIC (the next network on that parent is refused);
- an endpoint whose DeleteEndpoint reply was cut: Docker deleted it, the plugin keeps an unjoined record.

Mark and sweep: a network or unjoined endpoint that Docker does not list is collected only when a pass
at least ``grace`` seconds after the one that first missed it still finds it missing (a CreateNetwork or
CreateEndpoint in flight is not in Docker's lists yet). A joined endpoint is never collected here. Runs
in one elected worker (plugincore.background), never in a request handler: calling dockerd from there
can deadlock it. Off when ``gc_interval`` is 0 or ``docker_host`` is empty.
"""
from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger("netplugin.gc")


class DockerGC:
    def __init__(self, driver, docker_host: str, interval: float = 60.0, grace: float = 120.0,
                 clock=time.monotonic):
        self.driver, self.docker_host = driver, docker_host
        self.interval, self.grace, self.clock = interval, grace, clock
        self.suspects: dict[tuple[str, str], float] = {}  # ("network"|"endpoint", ID) -> first missed

    def sweep(self, docker_networks: dict[str, set[str]]) -> dict[str, int]:
        """One pass. ``docker_networks``: every network ID Docker lists -> the endpoint IDs it has on it
        (only needed for this plugin's networks). Returns how many networks and endpoints went."""
        now, missing, collected = self.clock(), set(), {"networks": 0, "endpoints": 0}
        for net in self.driver.state.networks():
            if net.id not in docker_networks:
                missing.add(("network", net.id))
        for ep in self.driver.state.endpoints():
            if not ep.sandbox and ep.network_id in docker_networks and ep.id not in docker_networks[ep.network_id]:
                missing.add(("endpoint", ep.id))
        self.suspects = {key: self.suspects.get(key, now) for key in missing}
        for (kind, object_id), since in sorted(self.suspects.items()):
            if now - since < self.grace:
                continue
            try:
                self._collect(kind, object_id)
            except Exception:  # noqa: BLE001 - one object must not stop the rest; tried again next pass
                log.exception("collecting %s %s failed", kind, object_id[:12])
                continue
            del self.suspects[(kind, object_id)]
            collected[kind + "s"] += 1
        return collected

    def _collect(self, kind: str, object_id: str) -> None:
        if kind == "network":
            if self.driver.state.get_network(object_id) is None:
                return  # deleted meanwhile
            log.warning("network %s is unknown to Docker (a CreateNetwork whose reply was cut off): deleting it",
                        object_id[:12])
            self.driver.delete_network(object_id)
            return
        ep = self.driver.state.get_endpoint(object_id)
        if ep is None or ep.sandbox:
            return  # deleted or joined meanwhile
        log.warning("endpoint %s is unknown to Docker (a DeleteEndpoint whose reply was cut off): deleting it",
                    object_id[:12])
        self.driver.delete_endpoint(ep.network_id, ep.id)

    def listing(self, client) -> dict[str, set[str]]:
        """Docker's networks, with the endpoints of those this plugin also has."""
        ours = {net.id for net in self.driver.state.networks()}
        listed = {}
        for summary in client.api.networks():
            endpoints = set()
            if summary["Id"] in ours:
                details = client.api.inspect_network(summary["Id"])
                endpoints = {c.get("EndpointID") for c in (details.get("Containers") or {}).values()}
            listed[summary["Id"]] = endpoints
        return listed

    def run(self, stop: threading.Event) -> None:
        import docker

        failures = 0
        while not stop.wait(self.interval):
            client = None
            try:
                client = docker.DockerClient(base_url=self.docker_host, timeout=30)
                collected = self.sweep(self.listing(client))
                failures = 0
            except Exception as exc:  # noqa: BLE001 - dockerd down or restarting: nothing is collected
                failures += 1
                if failures == 1 or failures % 30 == 0:
                    log.warning("garbage collection: Docker at %s: %s; retrying", self.docker_host, exc)
                continue
            finally:
                if client is not None:
                    client.close()
            if any(collected.values()):
                log.info("garbage collection: %s", collected)

"""Garbage collection against Docker's own lists: what a crash leaves in the plugin that Docker can never
tell it about.

dockerd re-sends a request whose connection broke, but with an empty body (moby/moby#39331). The plugin
refuses the empty copy, and Docker then fails or finishes the operation without it. What the first,
cut-off copy did stays here (found by the torture through dockerd, tests/e2e/test_torture_e2e.py):
- a network whose CreateNetwork reply was cut: Docker forgot the network, the plugin keeps it, and with it
  its parent NIC (the next network on that parent is refused);
- an endpoint whose DeleteEndpoint reply was cut: Docker deleted it, the plugin keeps an unjoined record;
- a pool reference whose RequestPool reply was cut: Docker has no network on it, the pool stays reserved;
- an address whose RequestAddress reply was cut: no endpoint of Docker's has it, it is never handed out.

Mark and sweep: an object that Docker does not explain is collected only when a pass at least ``grace``
seconds after the one that first missed it still finds it unexplained (a request in flight is not in
Docker's lists yet). A joined endpoint is never collected here. Pools and addresses only in the local
IPAM, and a pool only while every network of Docker's on its subnet has local scope: a swarm or
multi-host network has addresses this host's Docker does not list. A pool is matched to Docker's
networks by subnet, whatever IPAM driver name Docker shows for them (a plugin may be known under more
than one name): a network of another IPAM on the same subnet only makes the collection keep more.
Runs in one elected worker (plugincore.background), never in a request handler: calling dockerd from
there can deadlock it. Off when ``gc_interval`` is 0 or ``docker_host`` is empty.
"""
from __future__ import annotations

import ipaddress
import logging
import threading
import time
from dataclasses import dataclass

from plugincore.background import every_interval_with_docker

log = logging.getLogger("netplugin.gc")


@dataclass(frozen=True)
class Listed:
    """A network as Docker lists it. Endpoints and addresses are read for this plugin's networks and for
    networks on the subnet of one of its pools only."""
    endpoints: frozenset = frozenset()
    local: bool = True  # Docker's scope "local"
    subnets: frozenset = frozenset()  # of its IPAM configuration (ip_network)
    addresses: frozenset = frozenset()  # its gateways, auxiliary and endpoint addresses, without length


class DockerGC:
    def __init__(self, driver, docker_host: str, interval: float = 60.0, grace: float = 120.0,
                 clock=time.monotonic, ipam=None):
        """``ipam``: the local IPAM (None: pools and addresses are not collected)."""
        self.driver, self.docker_host = driver, docker_host
        self.interval, self.grace, self.clock = interval, grace, clock
        self.ipam = ipam
        self.suspects: dict[tuple[str, str], float] = {}  # (kind, ID) -> first missed
        self.excess: dict[str, int] = {}  # pool ID -> references beyond Docker's networks, this pass

    def sweep(self, docker: dict[str, Listed]) -> dict[str, int]:
        """One pass over Docker's networks (ID -> Listed). Returns how many objects of each kind went."""
        now, missing = self.clock(), set()
        collected = {"networks": 0, "endpoints": 0, "pool references": 0, "addresses": 0}
        for net in self.driver.state.networks():
            if net.id not in docker:
                missing.add(("network", net.id))
        for ep in self.driver.state.endpoints():
            if not ep.sandbox and ep.network_id in docker and ep.id not in docker[ep.network_id].endpoints:
                missing.add(("endpoint", ep.id))
        if self.ipam is not None:
            missing |= self._unexplained_allocations(docker)
        self.suspects = {key: self.suspects.get(key, now) for key in missing}
        for (kind, object_id), since in sorted(self.suspects.items()):
            if now - since < self.grace:
                continue
            try:
                gone = self._collect(kind, object_id)
            except Exception:  # noqa: BLE001 - one object must not stop the rest; tried again next pass
                log.exception("collecting %s %s failed", kind, object_id[:12])
                continue
            del self.suspects[(kind, object_id)]
            collected[{"network": "networks", "endpoint": "endpoints", "pool": "pool references",
                       "address": "addresses"}[kind]] += gone
        return collected

    def _unexplained_allocations(self, docker: dict[str, Listed]) -> set[tuple[str, str]]:
        """Pool references beyond the networks Docker has on a pool, and addresses in a pool that none of
        those networks has (gateways go with their pool)."""
        missing, self.excess = set(), {}
        for pool in self.ipam.pools():
            using = [n for n in docker.values() if _network(pool["pool"]) in n.subnets]
            if pool["space"] != "local" or not all(n.local for n in using):
                continue
            if pool["refs"] > len(using):
                missing.add(("pool", pool["id"]))
                self.excess[pool["id"]] = pool["refs"] - len(using)
            if using:
                held = frozenset().union(*(n.addresses for n in using))
                missing |= {("address", f"{pool['id']} {address}")
                            for address, kind in self.ipam.addresses(pool["id"])
                            if kind == "address" and address not in held}
        return missing

    def _collect(self, kind: str, object_id: str) -> int:
        if kind == "network":
            if self.driver.state.get_network(object_id) is None:
                return 0  # deleted meanwhile
            log.warning("network %s is unknown to Docker (a CreateNetwork whose reply was cut off): deleting it",
                        object_id[:12])
            self.driver.delete_network(object_id)
            return 1
        if kind == "endpoint":
            ep = self.driver.state.get_endpoint(object_id)
            if ep is None or ep.sandbox:
                return 0  # deleted or joined meanwhile
            log.warning("endpoint %s is unknown to Docker (a DeleteEndpoint whose reply was cut off): deleting it",
                        object_id[:12])
            self.driver.delete_endpoint(ep.network_id, ep.id)
            return 1
        if kind == "pool":
            excess = self.excess.get(object_id, 0)
            log.warning("pool %s has %d reference(s) no network of Docker's explains (a RequestPool whose reply "
                        "was cut off): releasing them", object_id, excess)
            for _ in range(excess):
                self.ipam.release_pool(object_id)
            return excess
        pool_id, address = object_id.rsplit(" ", 1)
        log.warning("address %s in pool %s is on no endpoint of Docker's (a RequestAddress whose reply was cut "
                    "off): releasing it", address, pool_id)
        self.ipam.release_address(pool_id, address)
        return 1

    def listing(self, client) -> dict[str, Listed]:
        """Docker's networks, read in detail where they are this plugin's or on one of its pools' subnets
        (the list has no endpoints)."""
        ours = {net.id for net in self.driver.state.networks()}
        pooled = {_network(pool["pool"]) for pool in self.ipam.pools()} if self.ipam is not None else set()
        listed = {}
        for summary in client.api.networks():
            brief = docker_network(summary)
            if summary["Id"] in ours or brief.subnets & pooled:
                brief = docker_network(client.api.inspect_network(summary["Id"]))
            listed[summary["Id"]] = brief
        return listed

    def run(self, stop: threading.Event) -> None:
        every_interval_with_docker(self.docker_host, self.interval, stop, self.one_pass)

    def one_pass(self, client) -> None:
        collected = self.sweep(self.listing(client))
        if any(collected.values()):
            log.info("garbage collection: %s", collected)


def docker_network(details: dict) -> Listed:
    """A Listed from Docker's network inspect (or list, which has no containers)."""
    ipam = details.get("IPAM") or {}
    subnets, addresses = set(), set()
    for config in ipam.get("Config") or []:
        if config.get("Subnet"):
            subnets.add(_network(config["Subnet"]))
        for address in [config.get("Gateway"), *(config.get("AuxiliaryAddresses") or {}).values()]:
            if address:
                addresses.add(_address(address))
    endpoints = set()
    for container in (details.get("Containers") or {}).values():
        endpoints.add(container.get("EndpointID"))
        for key in ("IPv4Address", "IPv6Address"):
            if container.get(key):
                addresses.add(_address(container[key]))
    return Listed(endpoints=frozenset(endpoints), local=details.get("Scope", "local") == "local",
                  subnets=frozenset(subnets), addresses=frozenset(addresses))


def _network(text: str):
    return ipaddress.ip_network(text, strict=False)


def _address(text: str) -> str:
    return str(ipaddress.ip_interface(text).ip)

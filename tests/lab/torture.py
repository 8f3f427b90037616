"""Crash-injection torture of a served netplugin straight through its socket: random sequences of what
dockerd does (create/delete networks with their pool and gateway, run/stop containers: address, endpoint,
join, and back), with ``kill -9`` of the whole plugin between requests and in the middle of them, and
restarts. After every round, ``tests.lab.audit`` compares state, kernel and what "Docker" holds.

The caller plays dockerd faithfully:
- A request that cannot connect (the plugin is down) is retried until it answers, as dockerd's plugin
  client does (with backoff, for up to 30 s).
- A request whose connection breaks after it was sent fails. The operation then rolls back with Docker's
  own calls, which are retried in their turn.
- An address whose RequestAddress reply was lost is unknown to Docker, which cannot give it back. Such
  addresses are counted apart (``lost_addresses``, ``lost_pools``): a limit of the protocol, not a leak
  of the plugin.
"""
from __future__ import annotations

import http.client
import random
import signal
import threading
import time

from . import plugin_post
from .audit import audit_netplugin

RETRY_FOR = 30.0


class LostReply(Exception):
    """The request went out and the connection broke before the reply: its outcome is unknown."""


class NetTorture:
    def __init__(self, plugin, parents: list[str], rng: random.Random, *, underlay: str | None = None,
                 network_options: dict | None = None):
        # parents: NICs a network takes for itself (static mode, or the mode network_options name: e.g.
        # SR-IOV PFs); underlay: a NIC with an address that carries any number of VXLAN overlay networks
        # (each its own VNI from the plugin's registry)
        self.plugin, self.parents, self.rng, self.underlay = plugin, parents, rng, underlay
        self.network_options = network_options or {}
        self.networks: dict[str, dict] = {}   # network ID -> {parent, pool, gateway}
        self.endpoints: dict[str, dict] = {}  # endpoint ID -> {network, address}
        # endpoints whose DeleteEndpoint failed: dockerd keeps them (and their address) in its store and
        # deletes them for good when it starts again (libnetwork's cleanup of stale endpoints)
        self.stale: dict[str, dict] = {}
        self.orphans: set[str] = set()  # IDs a lost rollback call left behind (see quietly)
        self.deleting: set[str] = set()  # networks whose DeleteNetwork reply was lost: `rm` is repeated
        self.lost_addresses: dict[str, int] = {}  # pool ID -> RequestAddress replies lost in a kill
        self.lost_pools = 0  # RequestPool replies lost in a kill
        self.counts = {"operations": 0, "failed operations": 0, "kills between": 0, "kills during": 0,
                       "restarts": 0, "requests": 0, "retried requests": 0}
        self.findings: list[str] = []
        self.trace: list[tuple] = []  # (route, network or pool, status | "lost" | "kill") of every call
        self._subnets = iter(range(1, 250))

    # -- the wire, as dockerd uses it --
    def call(self, route: str, body: dict) -> dict:
        deadline = time.monotonic() + RETRY_FOR
        while True:
            try:
                status, reply = plugin_post(self.plugin.socket, route, body, timeout=30)
                break
            except (ConnectionRefusedError, FileNotFoundError):  # not listening (yet): dockerd retries
                if time.monotonic() > deadline:
                    raise
                self.counts["retried requests"] += 1
                time.sleep(0.05)
            except (http.client.HTTPException, OSError) as exc:  # sent, then cut off: reset, EOF, half a reply
                self.trace.append((route, body.get("NetworkID") or body.get("PoolID"), "lost"))
                if route in ("/IpamDriver.RequestAddress", "/IpamDriver.ReleaseAddress"):
                    # either way Docker cannot know whether the address is allocated: it forgets it
                    self.lost_addresses[body["PoolID"]] = self.lost_addresses.get(body["PoolID"], 0) + 1
                elif route == "/IpamDriver.RequestPool":
                    self.lost_pools += 1
                raise LostReply(f"{route}: {exc}") from None
        self.counts["requests"] += 1
        self.trace.append((route, body.get("EndpointID") or body.get("NetworkID") or body.get("PoolID"), status,
                           body.get("Address") or reply.get("Address")))
        if status != 200:
            raise RuntimeError(f"{route} {body} -> {status} {reply}")
        return reply

    def quietly(self, route: str, body: dict) -> None:
        """A rollback call: Docker ignores its failure, but not a refused connection (it retries). When a
        kill also cuts this one short (the dying group still accepted it), what it was to undo may stay
        in the plugin while Docker forgets it: counted as an orphan of a double fault."""
        try:
            self.call(route, body)
        except LostReply:
            self.counts["rollback calls lost"] = self.counts.get("rollback calls lost", 0) + 1
            self.orphans.add(body.get("EndpointID") or body.get("NetworkID") or "")
        except RuntimeError:
            pass

    # -- what dockerd does --
    def create_network(self) -> None:
        free = [p for p in self.parents if p not in {n["parent"] for n in self.networks.values()}]
        overlay = self.underlay is not None and (not free or self.rng.random() < 0.4)
        if not free and not overlay:
            return self.delete_network()
        net_id, subnet = self._id(), f"10.{100 + next(self._subnets) % 100}.0.0/24"
        parent = self.underlay if overlay else self.rng.choice(free)
        pool = self.call("/IpamDriver.RequestPool", {"AddressSpace": "local", "Pool": subnet, "SubPool": "",
                                                     "Options": {}, "V6": False})["PoolID"]
        gateway = None
        try:
            gateway = self.call("/IpamDriver.RequestAddress", {"PoolID": pool, "Address": "", "Options": {
                "RequestAddressType": "com.docker.network.gateway"}})["Address"]
            generic = {"parent": parent, **({"egress": "20mbit"} if self.rng.random() < 0.3 else {})}
            if overlay:
                generic.update(mode="overlay", overlay=f"ov{net_id[:8]}")
            else:
                generic.update(self.network_options)
            self.call("/NetworkDriver.CreateNetwork", {
                "NetworkID": net_id, "Options": {"com.docker.network.generic": generic},
                "IPv4Data": [{"AddressSpace": "local", "Pool": subnet, "Gateway": gateway}], "IPv6Data": []})
        except Exception:
            self.quietly("/NetworkDriver.DeleteNetwork", {"NetworkID": net_id})
            if gateway:
                self.quietly("/IpamDriver.ReleaseAddress", {"PoolID": pool, "Address": gateway.split("/")[0]})
            self.quietly("/IpamDriver.ReleasePool", {"PoolID": pool})
            raise
        self.networks[net_id] = {"parent": parent, "pool": pool, "gateway": gateway}

    def delete_network(self) -> None:
        idle = [n for n in self.networks
                if not any(e["network"] == n for e in [*self.endpoints.values(), *self.stale.values()])]
        if not idle:
            return self.stop_container()
        net_id = self.rng.choice(idle)
        # dockerd keeps a network whose DeleteNetwork failed (`docker network rm` fails): tried again later.
        # Until then the plugin may or may not have deleted it.
        try:
            self.call("/NetworkDriver.DeleteNetwork", {"NetworkID": net_id})
        except LostReply:
            self.deleting.add(net_id)
            raise
        self.deleting.discard(net_id)
        net = self.networks.pop(net_id)
        self.quietly("/IpamDriver.ReleaseAddress", {"PoolID": net["pool"], "Address": net["gateway"].split("/")[0]})
        self.quietly("/IpamDriver.ReleasePool", {"PoolID": net["pool"]})

    def run_container(self) -> None:
        if not self.networks:
            return self.create_network()
        usable = sorted(set(self.networks) - self.deleting)  # a user repeats `network rm` before using it
        if not usable:
            return self.delete_network()
        net_id = self.rng.choice(usable)
        pool, ep_id = self.networks[net_id]["pool"], self._id()
        address = self.call("/IpamDriver.RequestAddress", {"PoolID": pool, "Address": "", "Options": None})["Address"]
        options = {"egress": f"{self.rng.choice([5, 10, 40])}mbit"} if self.rng.random() < 0.5 else {}
        try:
            self.call("/NetworkDriver.CreateEndpoint", {"NetworkID": net_id, "EndpointID": ep_id,
                                                        "Interface": {"Address": address}, "Options": options})
            joined = self.call("/NetworkDriver.Join", {"NetworkID": net_id, "EndpointID": ep_id,
                                                       "SandboxKey": f"/var/run/docker/netns/{ep_id[:12]}",
                                                       "Options": {}})
        except Exception:
            self.quietly("/NetworkDriver.Leave", {"NetworkID": net_id, "EndpointID": ep_id})
            self.quietly("/NetworkDriver.DeleteEndpoint", {"NetworkID": net_id, "EndpointID": ep_id})
            self.quietly("/IpamDriver.ReleaseAddress", {"PoolID": pool, "Address": address.split("/")[0]})
            raise
        self.endpoints[ep_id] = {"network": net_id, "address": address}
        self.enter_sandbox(self.endpoints[ep_id], joined)

    def enter_sandbox(self, ep: dict, joined: dict) -> None:
        """What dockerd does with the interface Join named; here it stays in this netns (a subclass
        moves it where the plugin's reconciliation must find it, e.g. an SR-IOV VF)."""

    def leave_sandbox(self, ep: dict) -> None:
        """What dockerd does when the container stops, before Leave: the interface comes back."""

    def stop_container(self) -> None:
        if not self.endpoints:
            return self.run_container()
        ep_id = self.rng.choice(sorted(self.endpoints))
        ep = self.endpoints.pop(ep_id)
        self.leave_sandbox(ep)
        self.quietly("/NetworkDriver.Leave", {"NetworkID": ep["network"], "EndpointID": ep_id})
        try:
            self.call("/NetworkDriver.DeleteEndpoint", {"NetworkID": ep["network"], "EndpointID": ep_id})
        except (LostReply, RuntimeError):
            self.stale[ep_id] = ep
            raise
        self._release(ep)

    def _release(self, ep: dict) -> None:
        pool = self.networks[ep["network"]]["pool"]
        self.quietly("/IpamDriver.ReleaseAddress", {"PoolID": pool, "Address": ep["address"].split("/")[0]})

    def dockerd_restart(self) -> None:
        """What dockerd does with its stale endpoints when it starts: delete them for good."""
        self.counts["dockerd restarts"] = self.counts.get("dockerd restarts", 0) + 1
        for ep_id, ep in list(self.stale.items()):
            self.call("/NetworkDriver.DeleteEndpoint", {"NetworkID": ep["network"], "EndpointID": ep_id})
            self._release(self.stale.pop(ep_id))

    # -- the run --
    def run(self, operations: int, audit_every: int, fault_rate: float) -> None:
        for done in range(operations):
            self.step(fault_rate)
            if (done + 1) % audit_every == 0:
                self.audit(f"after {done + 1} operations")

    def report(self, what: str, seed: int, extra: str = "") -> None:
        print(f"\n{what} (seed {seed}): " + ", ".join(f"{v} {k}" for k, v in self.counts.items())
              + extra + f", {len(self.findings)} findings")
        for finding in self.findings[:40]:
            print("  " + finding)

    def operation(self):
        weights = [(self.create_network, 1), (self.delete_network, 1), (self.run_container, 4),
                   (self.stop_container, 3), (self.dockerd_restart, 0.2)]
        return self.rng.choices([w[0] for w in weights], [w[1] for w in weights])[0]

    def step(self, fault_rate: float) -> None:
        op = self.operation()
        self.counts["operations"] += 1
        roll = self.rng.random()
        if roll < fault_rate / 2:
            self.kill_and_restart()
            self.counts["kills between"] += 1
        if roll > 1 - fault_rate / 2:
            self.counts["kills during"] += 1
            errors = []
            worker = threading.Thread(target=self._run, args=(op, errors))
            worker.start()
            time.sleep(self.rng.uniform(0, 0.04))
            self.kill_and_restart()
            worker.join(120)
            assert not worker.is_alive(), "an operation hung after the plugin came back"
        else:
            self._run(op, [])

    def _run(self, op, errors: list) -> None:
        try:
            op()
        except (LostReply, RuntimeError) as exc:
            self.counts["failed operations"] += 1
            errors.append(exc)
        except Exception as exc:  # noqa: BLE001 - anything else is the harness's or the plugin's bug
            self.findings.append(f"{op.__name__} raised {exc.__class__.__name__}: {exc}")

    def kill_and_restart(self) -> None:
        self.trace.append(("kill", None, None))
        self.plugin.kill(signal.SIGKILL)
        self.plugin.start(timeout=60)
        self.counts["restarts"] += 1

    def audit(self, when: str) -> list[str]:
        held = {(n["pool"], n["gateway"].split("/")[0]) for n in self.networks.values()}
        held |= {(self.networks[e["network"]]["pool"], e["address"].split("/")[0])
                 for e in [*self.endpoints.values(), *self.stale.values()]}
        found = audit_netplugin(self.plugin.state_dir / "netplugin.db", parents=self.parents, held_addresses=held)
        found += self._audit_model()
        found = self._excuse_lost_replies(found)
        self.findings += [f"{when}: {f}" for f in found]
        return found

    def _excuse_lost_replies(self, found: list[str]) -> list[str]:
        """An address per lost RequestAddress reply may stay allocated: Docker never learnt it."""
        budget, kept = dict(self.lost_addresses), []
        orphans = {o[:12] for o in self.orphans if o}
        for finding in found:
            if any(o in finding for o in orphans):
                continue
            pool = finding.rpartition(" in pool ")[2] if finding.startswith("leaked address ") else None
            if pool and budget.get(pool, 0) > 0:
                budget[pool] -= 1
                continue
            kept.append(finding)
        return kept

    def _audit_model(self) -> list[str]:
        """What Docker holds must exist in the plugin: its networks ready, its endpoints joined."""
        rows = {r[0]: r[1] for r in self.plugin.state_rows("SELECT id, status FROM networks")}
        joined = {r[0]: r[1] for r in self.plugin.state_rows("SELECT id, sandbox FROM endpoints")}
        found = [f"Docker's network {n[:12]} is {rows.get(n, 'unknown to the plugin')}"
                 for n in self.networks if rows.get(n) != "ready" and n not in self.deleting]
        found += [f"Docker's endpoint {e[:12]} is {'not joined' if e in joined else 'unknown to the plugin'}"
                  for e in self.endpoints if not joined.get(e)]
        extra_nets = set(rows) - set(self.networks) - self.orphans
        extra_eps = set(joined) - set(self.endpoints) - set(self.stale) - self.orphans
        found += [f"stale endpoint {e[:12]} is still joined" for e in self.stale if joined.get(e)]
        found += [f"network {n[:12]} the plugin keeps but Docker deleted" for n in sorted(extra_nets)]
        found += [f"endpoint {e[:12]} the plugin keeps but Docker deleted" for e in sorted(extra_eps)]
        return found

    def teardown(self) -> None:
        self.dockerd_restart()
        while self.endpoints:
            self.stop_container()
        while self.networks:
            self.delete_network()

    def _id(self) -> str:
        return "%064x" % self.rng.getrandbits(256)

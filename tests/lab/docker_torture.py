"""Crash-injection torture through a real dockerd: random `docker` network, volume and container operations
on netplugin networks (both parents) and volplugin RBD volumes, with faults between and in the middle of
them: ``kill -9`` of either plugin's process group (restarted at once), graceful plugin restarts, dockerd
restarts and kills (``--live-restore``), and a Ceph OSD stop/start while a volume operation runs.

What Docker holds is asked, never guessed: ``docker inspect``, ``network inspect``, ``volume ls`` and the
mount IDs in each running container's config. A failed command is a failed operation, not a finding. The
audit compares Docker with both plugins' state (SQLite, read only), the Docker host's kernel
(tests.lab.audit), this host's mounts and the RBD pool (tests.lab.volaudit); every running container must
answer a ping on each address and its volume must hold the token of every container that started on it.

Cut-off requests: dockerd re-sends a plugin request whose connection broke, but with an empty body
(moby#39331), which the plugins refuse; Docker then fails or finishes the operation without them. What the
first, cut-off copy did stays in the plugin unknown to Docker: an address or pool reference it allocated,
a mount it added (never unmounted), a network or endpoint it kept. Up to one of those per kill during an
operation on that network or volume is counted apart, then removed through the plugin's socket as a
garbage collection against Docker's lists would (netplugin's own, netplugin/docker_gc.py, waits gc_grace,
120 s, before it collects; volplugin drops stale mount IDs only at Remove). Also counted apart, a Docker bug: after a failed `network connect` the container's config keeps
the network with the endpoint libnetwork rolled back.
"""
from __future__ import annotations

import collections
import itertools
import json
import re
import signal
import threading
import time
from dataclasses import dataclass

from .docker_audit import SLOTS, DockerAudit
from .image import IMAGE

MAX_CONTAINERS, MAX_VOLUMES, VOLUME_OPTS = 6, 4, ("size=64M", "fs=ext4")
DOCKER_TIMEOUT = 150  # a command longer than this is a finding (dockerd gives a plugin 30 s of retries)
QUIET_ROUTES = re.compile(rb"/(Plugin.Activate|\w+.Capabilities|VolumeDriver.(List|Get|Path)|"
                          rb"NetworkDriver.EndpointOperInfo)$")
NETWORK_OPS = ("network create", "network rm")


@dataclass
class Plan:
    label: str
    argv: list
    pools: tuple = ()    # IPAM pool IDs the operation touches
    volumes: tuple = ()  # volumes it touches
    done: object = None  # called when the command succeeded


class DockerTorture(DockerAudit):
    def __init__(self, dockerd, netplugin, volplugin, physnet, ceph, rng, tag: str):
        self.dockerd, self.np, self.vp, self.physnet, self.ceph = dockerd, netplugin, volplugin, physnet, ceph
        self.rng, self.tag, self.ids = rng, tag, itertools.count(1)
        self.counts = collections.Counter()
        self.failures = collections.Counter()   # failed operations by label and error
        self.findings: list[str] = []
        self.tokens: dict[str, list[str]] = {}  # volume -> tokens of the containers that started on it
        self.live: set[str] = set()             # containers whose `docker run` succeeded, until removed
        # kills during operations, by what they touched: the budgets of what cut-off requests may leave
        self.cut = collections.Counter()        # "netplugin": on a network, "network": network create/rm
        self.lost_addresses = collections.Counter()  # pool ID -> netplugin kills during an operation on it
        self.lost_mounts = collections.Counter()     # volume -> volplugin kills during an operation on it
        self.cut_volumes: set[str] = set()           # volumes whose Create or Remove may have been cut off
        self.excused: dict[str, set] = {}            # what was counted apart, by kind
        self.failed_connects: set[tuple] = set()     # (network, container) of each failed `network connect`

    def docker(self, *args, check: bool = False):
        return self.dockerd.docker(*args, check=check, timeout=DOCKER_TIMEOUT)

    # -- what Docker holds --
    def view(self) -> dict:
        containers, networks = {}, {}
        ids = self.docker("ps", "-aq", "--no-trunc", check=True).stdout.split()
        for c in json.loads(self.docker("inspect", *ids, check=True).stdout) if ids else []:
            running = c["State"]["Running"]
            containers[c["Name"].lstrip("/")] = {
                "running": running, "status": c["State"]["Status"],
                "networks": {n: {"ip": v["IPAddress"], "endpoint": v["EndpointID"]}
                             for n, v in (c["NetworkSettings"]["Networks"] or {}).items() if n.startswith(self.tag)},
                "volumes": [m["Name"] for m in c["Mounts"] if m.get("Driver") == self.vp.name],
                "mount_ids": self._mount_ids(c["Id"]) if running else {}}
        net_ids = self.docker("network", "ls", "-q", "--no-trunc", "--filter", f"driver={self.np.name}",
                              check=True).stdout.split()
        for n in json.loads(self.docker("network", "inspect", *net_ids, check=True).stdout) if net_ids else []:
            config = n["IPAM"]["Config"][0]
            networks[n["Name"]] = {"id": n["Id"], "parent": n["Options"].get("parent"),
                                   "pool": f"local/{config['Subnet']}", "gateway": config["Gateway"],
                                   "endpoints": {e["EndpointID"]: e["IPv4Address"].split("/")[0]
                                                 for e in (n.get("Containers") or {}).values()}}
        volumes = self.docker("volume", "ls", "-q", "--filter", f"driver={self.vp.name}", check=True).stdout.split()
        return {"containers": containers, "networks": networks, "volumes": set(volumes)}

    def _mount_ids(self, container_id: str) -> dict[str, str]:
        """Volume -> the mount ID Docker gave volplugin: only in the container's config on disk."""
        config = json.loads((self.dockerd.root / "data" / "containers" / container_id / "config.v2.json").read_text())
        return {m["Name"]: m.get("ID", "") for m in (config.get("MountPoints") or {}).values()
                if m.get("Driver") == self.vp.name}

    # -- operations: each makes a Plan from Docker's view, or falls back to one that can be done --
    def op_net_create(self, v):
        free = sorted(set(SLOTS) - {n["parent"] for n in v["networks"].values()})
        if not free:
            return self.op_net_rm(v)
        parent = self.rng.choice(free)
        subnet, gateway = SLOTS[parent]
        shaped = ["-o", f"egress={self.rng.choice([20, 50])}mbit"] if self.rng.random() < 0.3 else []
        return Plan("network create", ["network", "create", "-d", self.np.name, "--ipam-driver", self.np.name,
                                       "--subnet", subnet, "--gateway", gateway, "-o", f"parent={parent}", *shaped,
                                       f"{self.tag}n{next(self.ids)}"], pools=(f"local/{subnet}",))

    def op_net_rm(self, v):
        idle = sorted(set(v["networks"]) - {n for c in v["containers"].values() if c["running"] for n in c["networks"]})
        if not idle:
            return self.op_rm(v)
        name = self.rng.choice(idle)
        return Plan("network rm", ["network", "rm", name], pools=(v["networks"][name]["pool"],))

    def op_vol_create(self, v):
        if len(v["volumes"]) >= MAX_VOLUMES:
            return self.op_vol_rm(v)
        name = f"{self.tag}v{next(self.ids)}"
        options = [a for o in VOLUME_OPTS for a in ("-o", o)]
        return Plan("volume create", ["volume", "create", "-d", self.vp.name, *options, name], volumes=(name,))

    def op_vol_rm(self, v):
        unused = sorted(v["volumes"] - {vol for c in v["containers"].values() for vol in c["volumes"]})
        if not unused:
            return self.op_rm(v)
        name = self.rng.choice(unused)
        return Plan("volume rm", ["volume", "rm", name], volumes=(name,), done=lambda: self.tokens.pop(name, None))

    def op_run(self, v):
        if not v["networks"]:
            return self.op_net_create(v)
        if len(v["containers"]) >= MAX_CONTAINERS:
            return self.op_rm(v)
        net = self.rng.choice(sorted(v["networks"]))
        name, token = f"{self.tag}c{next(self.ids)}", "%08x" % self.rng.getrandbits(32)
        argv, vol, roll = ["run", "-d", "--name", name, "--network", net, *self._ip(v, net)], None, self.rng.random()
        if roll < 0.45 and v["volumes"]:  # an existing volume, maybe shared with a running container
            vol = self.rng.choice(sorted(v["volumes"]))
            argv += ["-v", f"{vol}:/data"]
        elif roll < 0.6 and len(v["volumes"]) < MAX_VOLUMES:  # a new one, created by `docker run` itself
            vol = f"{self.tag}v{next(self.ids)}"
            argv += ["--mount", f"type=volume,src={vol},dst=/data,volume-driver={self.vp.name},"
                     + ",".join(f"volume-opt={o}" for o in VOLUME_OPTS)]
        argv += [IMAGE, "sh", "-c", f"echo {token} >> /data/marker; exec sleep 1d" if vol else "exec sleep 1d"]

        def done():
            self.live.add(name)
            if vol:
                self.tokens.setdefault(vol, []).append(token)
        return Plan("run", argv, pools=(v["networks"][net]["pool"],), volumes=(vol,) if vol else (), done=done)

    def op_rm(self, v):
        if not v["containers"]:
            return self.op_run(v)
        stopped = sorted(n for n, c in v["containers"].items() if not c["running"])  # a failed run leaves one
        name = self.rng.choice(stopped if stopped and self.rng.random() < 0.7 else sorted(v["containers"]))
        c = v["containers"][name]
        pools = tuple(v["networks"][n]["pool"] for n in c["networks"] if n in v["networks"])
        return Plan("rm -f", ["rm", "-f", name], pools=pools, volumes=tuple(c["volumes"]),
                    done=lambda: self.live.discard(name))

    def op_connect(self, v, disconnect: bool = False):
        pairs = [(c, n) for c, info in sorted(v["containers"].items()) if info["running"]
                 for n in sorted(v["networks"]) if (n in info["networks"]) == disconnect]
        if not pairs:
            return self.op_run(v)
        container, net = self.rng.choice(pairs)
        argv = ["network", "disconnect"] if disconnect else ["network", "connect", *self._ip(v, net)]
        return Plan(" ".join(argv[:2]), [*argv, net, container], pools=(v["networks"][net]["pool"],))

    def _ip(self, v, net) -> list[str]:
        """Half the time an explicit --ip: mostly a random one, now and then one in use (refused)."""
        if self.rng.random() < 0.5:
            return []
        used = [c["networks"][net]["ip"] for c in v["containers"].values() if c["networks"].get(net, {}).get("ip")]
        if used and self.rng.random() < 0.1:
            return ["--ip", self.rng.choice(used)]
        return ["--ip", f"10.77.0.{int(v['networks'][net]['gateway'].split('.')[3]) + self.rng.randrange(1, 60)}"]

    # -- the run --
    def step(self) -> None:
        v = self.view()
        ops = [(self.op_run, 4), (self.op_rm, 3), (self.op_net_create, 1), (self.op_net_rm, 1),
               (self.op_vol_create, 1), (self.op_vol_rm, 1), (self.op_connect, 0.7),
               (lambda view: self.op_connect(view, disconnect=True), 0.7)]
        plan = self.rng.choices([o for o, _ in ops], [w for _, w in ops])[0](v)
        self.counts["operations"] += 1
        roll = self.rng.random()
        if roll < 0.195:  # before the operation: kill -9 a plugin, restart one, restart or kill dockerd
            fault, what = next((f, w) for limit, f, w in (
                (0.06, lambda: self.kill_and_restart(self.np), "kills between (netplugin)"),
                (0.12, lambda: self.kill_and_restart(self.vp), "kills between (volplugin)"),
                (0.15, lambda: self.rng.choice([self.np, self.vp]).restart(timeout=60), "graceful plugin restarts"),
                (0.18, lambda: self.dockerd.restart(timeout=60), "dockerd restarts"),
                (1, lambda: (self.dockerd.kill(signal.SIGKILL), self.dockerd.start(timeout=60)), "dockerd kills"))
                if roll < limit)  # a dockerd kill takes containerd along; the containers' shims stay
            fault()
            self.counts[what] += 1
        elif roll < 0.23 and plan.volumes:  # the OSD goes away while the operation runs, and comes back
            self.counts["OSD stop/start"] += 1
            self.ceph.stop_osd()
            return self._during(plan, self.rng.uniform(0.3, 3.0), lambda: self.ceph.start_osd(timeout=90))
        if roll <= 0.80:
            return self.execute(plan)
        target = self.np if plan.pools and (not plan.volumes or self.rng.random() < 0.5) else self.vp
        if target is self.np:
            self.lost_addresses.update(plan.pools)
            self.cut.update(["netplugin"] * bool(plan.pools) + ["network"] * (plan.label in NETWORK_OPS))
        else:
            self.lost_mounts.update(plan.volumes)
            self.cut_volumes |= set(plan.volumes)
        self.counts["kills during (netplugin)" if target is self.np else "kills during (volplugin)"] += 1
        # half the kills wait for the n-th request that changes something to reach the plugin (gunicorn logs
        # it on arrival) and strike a few ms into it; the others come at a random moment
        nth = self.rng.choice([0, 0, 1, 2, 3])
        self._during(plan, self.rng.uniform(0, 0.015 if nth else 0.3), lambda: self.kill_and_restart(target),
                     watch=target if nth else None, nth=nth)

    def _during(self, plan, delay: float, fault, *, watch=None, nth: int = 0) -> None:
        offset = watch.log.stat().st_size if watch else 0
        worker = threading.Thread(target=self.execute, args=(plan,))
        worker.start()
        if watch:
            hit = _await_request(watch.log, offset, nth, worker)
            self.counts["kills during timed on a request" if hit else "kills during after the last request"] += 1
        time.sleep(delay)
        fault()
        worker.join(DOCKER_TIMEOUT + 30)
        if worker.is_alive():
            raise AssertionError(f"{plan.label} hung: {plan.argv}")

    def execute(self, plan) -> None:
        try:
            res = self.docker(*plan.argv)
        except Exception as exc:  # noqa: BLE001 - a hung command or a harness error: a finding either way
            self.findings.append(f"{plan.label} {' '.join(plan.argv[-2:])}: {exc.__class__.__name__}: {exc}")
            return
        if res.returncode == 0:
            return plan.done() if plan.done else None
        self.counts["failed operations"] += 1
        if plan.label == "network connect":
            self.failed_connects.add(tuple(plan.argv[-2:]))
        reason = (res.stderr.strip() or "?").replace("Error response from daemon: ", "").splitlines()[0]
        self.failures[f"{plan.label}: {reason[:110]}"] += 1

    @staticmethod
    def kill_and_restart(plugin) -> None:
        plugin.kill(signal.SIGKILL)
        plugin.start(timeout=60)

    # -- the end --
    def check_data_and_remove_everything(self) -> None:
        """Every volume still holds every token (read by a fresh container); then everything goes."""
        v = self.view()
        for vol in sorted(v["volumes"]):
            res = self.docker("run", "--rm", "--network", "none", "-v", f"{vol}:/data", IMAGE, "cat", "/data/marker")
            if lost := set(self.tokens.get(vol, [])) - set(res.stdout.split()):
                self.findings.append(f"at the end: volume {vol} lost tokens {sorted(lost)} {res.stderr.strip()[:200]}")
        for c in sorted(v["containers"]):
            self._must("rm", "-f", c)
        self.live.clear()
        self.audit("after removing the containers")  # also unmounts what cut-off Mounts left
        for vol in sorted(v["volumes"]):
            self._must("volume", "rm", vol)
        for net in sorted(v["networks"]):
            self._must("network", "rm", net)

    def _must(self, *args) -> None:
        res = self.docker(*args)
        if res.returncode != 0:
            self.findings.append(f"at the end: docker {' '.join(args)} failed: {res.stderr.strip()[:300]}")


def _await_request(log, offset: int, nth: int, worker) -> bool:
    """Wait until the n-th state-changing request after ``offset`` reached the plugin, or the operation ended."""
    seen, pending = 0, b""
    with open(log, "rb") as f:
        f.seek(offset)
        while worker.is_alive():
            chunk = f.read()
            if not chunk:
                time.sleep(0.001)
                continue
            *lines, pending = (pending + chunk).split(b"\n")
            seen += sum(1 for ln in lines if b"[DEBUG] POST /" in ln and not QUIET_ROUTES.search(ln))
            if seen >= nth:
                return True
    return False

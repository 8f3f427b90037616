"""The Compose example (examples/compose/docker-compose.yml) through Compose v1 (Debian's docker-compose
1.29.2) and a real dockerd: a netplugin network on the emulated physical network, a volplugin volume on
the shared test Ceph, PostgreSQL and a client at fixed addresses, per-container rates from service labels.
`up`, `down`, `up` again keeps the rows and the addresses; `down -v` removes the volume."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from tests.lab import REPO_ROOT, wait_until
from tests.lab.pgimage import psql, wait_pg_ready

pytestmark = pytest.mark.e2e
EXAMPLE = REPO_ROOT / "examples" / "compose" / "docker-compose.yml"
SUBNET, GW, DB_IP, CLIENT_IP = "10.77.0.0/24", "10.77.0.1", "10.77.0.20", "10.77.0.21"


class Compose:
    """``docker-compose -p PROJECT -f examples/compose/docker-compose.yml ...`` against the lab dockerd."""

    def __init__(self, dockerd, project: str, variables: dict[str, str]):
        self.binary = shutil.which("docker-compose")
        self.project = project
        self.variables = dict(variables)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DOCKER_", "COMPOSE_"))}
        # The lab daemon only (never the machine's), and its own client config dir, as Dockerd.docker.
        env.update(DOCKER_HOST=dockerd.host, DOCKER_CONFIG=str(dockerd.root / "client"), **variables)
        self.env = env

    def __call__(self, *args, check: bool = True, timeout: float = 120.0) -> subprocess.CompletedProcess:
        proc = subprocess.run([self.binary, "--ansi", "never", "-f", str(EXAMPLE), "-p", self.project, *args],
                              capture_output=True, text=True, timeout=timeout, env=self.env)
        if check:
            assert proc.returncode == 0, f"docker-compose {' '.join(args)}: {proc.returncode}\n{proc.stderr}"
        return proc

    def container(self, service: str) -> str:
        [cid] = self("ps", "-q", service).stdout.split()
        return cid


def _status(plugin) -> dict:
    proc = subprocess.run([sys.executable, "-m", "netplugin", "status", "--json", "--state-dir",
                           str(plugin.state_dir)], capture_output=True, text=True, timeout=30, check=True,
                          cwd=REPO_ROOT)
    return json.loads(proc.stdout)


def _volumes(volplugin) -> list[str]:
    proc = subprocess.run([sys.executable, "-m", "volplugin", "status", "--json", "--config", str(volplugin.config),
                           "--state-dir", str(volplugin.state_dir)], capture_output=True, text=True, timeout=120,
                          check=True, cwd=REPO_ROOT)
    return [v["name"] for v in json.loads(proc.stdout)["volumes"]]


def _net(docker, container: str) -> dict:
    """The container's one network: {"IPAddress", "EndpointID", ...} and the network's name."""
    nets = json.loads(docker("inspect", "-f", "{{json .NetworkSettings.Networks}}", container).stdout)
    [(name, settings)] = nets.items()
    return {**settings, "Network": name}


@pytest.fixture
def compose(dockerd, plugin, volplugin, pg_image):
    if shutil.which("docker-compose") is None:
        pytest.skip("docker-compose is not installed (bash scripts/setup installs Debian's)")
    c = Compose(dockerd, f"npc{os.urandom(3).hex()}", {
        "NETPLUGIN": plugin.name, "VOLPLUGIN": volplugin.name, "PG_IMAGE": pg_image,
        "PARENT": "eth1", "SUBNET": SUBNET, "GATEWAY": GW, "DB_IP": DB_IP, "CLIENT_IP": CLIENT_IP,
        "PG_SIZE": "1G", "NET_EGRESS": "80mbit", "DB_EGRESS": "30mbit", "CLIENT_INGRESS": "20mbit",
    })
    try:
        yield c
    finally:  # whatever happened: containers, network and volume go while both plugins still answer
        c("down", "-v", "--timeout", "5", check=False, timeout=120)


def test_compose_up_down_up_keeps_data_and_addresses(physnet, dockerd, docker, plugin, volplugin, compose):
    timings = {}
    volume, network = f"{compose.project}_pgdata", f"{compose.project}_pubnet"

    start = time.monotonic()
    compose("up", "-d", timeout=180)  # the client waits for the database's health check
    timings["up"] = time.monotonic() - start
    db, client = compose.container("db"), compose.container("client")
    wait_pg_ready(docker, db, timeout=60)
    psql(docker, db, "CREATE TABLE t (n int); INSERT INTO t SELECT generate_series(1, 100)")

    # The network as declared: driver, IPAM driver, subnet and gateway, driver options.
    net = json.loads(docker("network", "inspect", network).stdout)[0]
    assert (net["Driver"], net["IPAM"]["Driver"]) == (plugin.name, plugin.name)
    assert [(c["Subnet"], c["Gateway"]) for c in net["IPAM"]["Config"]] == [(SUBNET, GW)]
    assert net["Options"] == {"mode": "static", "parent": "eth1", "egress": "80mbit"}
    # The volume as declared.
    vol = json.loads(docker("volume", "inspect", volume).stdout)[0]
    assert vol["Driver"] == volplugin.name and vol["Options"] == {"size": "1G", "fs": "xfs", "uid": "999",
                                                                  "gid": "999"}
    assert (vol["Status"]["fs"], vol["Status"]["pg_version"]) == ("xfs", "15")

    # Fixed addresses on the physical network; the client reaches the database there, so does host B.
    db_net, client_net = _net(docker, db), _net(docker, client)
    assert (db_net["Network"], db_net["IPAddress"], client_net["IPAddress"]) == (network, DB_IP, CLIENT_IP)
    ready = docker("exec", client, "pg_isready", "-h", DB_IP, "-p", "5432", check=False)
    assert ready.returncode == 0 and "accepting connections" in ready.stdout, ready.stdout + ready.stderr
    assert docker("exec", "-u", "0", client, "ping", "-c", "1", "-W", "2", DB_IP, check=False).returncode == 0  # image: uid 999
    assert physnet.lab.ping(physnet.hostb, DB_IP) and physnet.lab.ping(physnet.hostb, CLIENT_IP)
    wait_until(lambda: "accepting connections" in docker("logs", client).stdout, 15.0, "the client's loop",
               interval=0.2)

    # Per-container rates from the services' labels (the plugin's label watcher), over the network default.
    wait_until(lambda: physnet.leaf_rates() == [30_000_000, 80_000_000], 15.0, "the label's HTB class",
               interval=0.2)
    endpoints = {e["id"]: e for e in _status(plugin)["endpoints"]}
    db_ep, client_ep = endpoints[db_net["EndpointID"]], endpoints[client_net["EndpointID"]]
    assert (db_ep["egress"], db_ep["ingress"]) == ("30mbit (label)", "")
    wait_until(lambda: {e["id"]: e for e in _status(plugin)["endpoints"]}[client_net["EndpointID"]]["ingress"]
               == "20mbit (label)", 15.0, "the client's ingress label", interval=0.2)
    assert client_ep["egress"] == "80mbit (network)"

    # `up -d` again while it runs: nothing to change (v1 compares the existing network's driver and options).
    again = compose("up", "-d")
    assert "is up-to-date" in again.stderr and compose.container("db") == db, again.stderr
    # ... and a changed network option is refused, not applied behind the containers' backs.
    changed = Compose(dockerd, compose.project, {**compose.variables, "NET_EGRESS": "60mbit"})("up", "-d", check=False)
    assert changed.returncode != 0 and 'needs to be recreated - option "egress" has changed' in changed.stderr, \
        changed.stderr

    start = time.monotonic()
    compose("down", timeout=120)
    timings["down"] = time.monotonic() - start
    assert docker("ps", "-aq").stdout.strip() == ""
    assert network not in docker("network", "ls", "--format", "{{.Name}}").stdout.split()
    assert volume in docker("volume", "ls", "-q").stdout.split()  # the data stays
    state = _status(plugin)
    assert state["networks"] == [] and state["endpoints"] == []
    assert physnet.leaf_rates() == []

    start = time.monotonic()
    compose("up", "-d", timeout=180)
    timings["up again"] = time.monotonic() - start
    db, client = compose.container("db"), compose.container("client")
    wait_pg_ready(docker, db, timeout=60)
    assert psql(docker, db, "SELECT count(*), sum(n) FROM t") == "100|5050"
    assert (_net(docker, db)["IPAddress"], _net(docker, client)["IPAddress"]) == (DB_IP, CLIENT_IP)
    assert docker("exec", client, "pg_isready", "-h", DB_IP, "-p", "5432", check=False).returncode == 0
    wait_until(lambda: physnet.leaf_rates() == [30_000_000, 80_000_000], 15.0, "the label's HTB class after up",
               interval=0.2)

    start = time.monotonic()
    compose("down", "-v", timeout=120)
    timings["down -v"] = time.monotonic() - start
    assert volume not in docker("volume", "ls", "-q").stdout.split()
    assert volume not in _volumes(volplugin)
    state = _status(plugin)
    assert state["networks"] == [] and state["endpoints"] == [] and state["pools"] == []
    assert "master" not in physnet.lab.sh(physnet.hosta, ["ip", "-o", "link", "show", "eth1"]).stdout
    print("compose timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))

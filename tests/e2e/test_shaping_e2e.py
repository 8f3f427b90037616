"""Rate limits through a real dockerd: a network default, a container label (read by the plugin's
label watcher from Docker's events), a `network connect --driver-opt`, and `netplugin shape` on a
running container, with real traffic to the emulated router."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from netplugin.kernel import shaping as tc
from tests.lab import REPO_ROOT, wait_until
from tests.lab.image import IMAGE
from tests.lab.plugin import Plugin

pytestmark = pytest.mark.e2e
SUBNET, GW = "10.77.0.0/24", "10.77.0.1"


@pytest.fixture
def shaping_plugin(dockerd, tmp_path):
    """netplugin in hosta that watches this test dockerd's events for labels."""
    config = tmp_path / "netplugin.toml"
    config.write_text(f'docker_host = "{dockerd.host}"\nlabels = true\n')
    p = Plugin(dockerd.netns, tmp_path / "plugin", extra_args=("--config", str(config)),
               docker_host=dockerd.host)
    p.config = config
    try:
        p.start()
        yield p
        dockerd.remove_all_containers(timeout=30)
        dockerd.remove_networks(driver=p.name, timeout=30)
    finally:
        p.destroy()


def _iperf_mbit(physnet, docker, container, seconds=3) -> float:
    """iperf3 from inside ``container`` (the host's binary in its netns) to the router."""
    pid = docker("inspect", "-f", "{{.State.Pid}}", container).stdout.strip()
    server = subprocess.Popen(["ip", "netns", "exec", physnet.router, "iperf3", "-s", "-1", "-p", "5410"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.3)
        out = subprocess.run(["nsenter", f"--net=/proc/{pid}/ns/net", "iperf3", "-c", GW, "-p", "5410",
                              "-t", str(seconds), "-O", "1", "-J"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)["end"]["sum_received"]["bits_per_second"] / 1e6
    finally:
        server.wait(timeout=10)


def _status(plugin) -> dict:
    proc = subprocess.run([sys.executable, "-m", "netplugin", "status", "--json", "--state-dir",
                           str(plugin.state_dir)], capture_output=True, text=True, timeout=30, check=True,
                          cwd=REPO_ROOT)
    return {e["id"]: e for e in json.loads(proc.stdout)["endpoints"]}


def test_rates_from_network_label_option_and_live_change(physnet, dockerd, docker, shaping_plugin):
    p = shaping_plugin
    docker("network", "create", "-d", p.name, "--ipam-driver", p.name, "--subnet", SUBNET, "--gateway", GW,
           "-o", "parent=eth1", "-o", "egress=80mbit", "shaped")
    docker("run", "-d", "--network", "shaped", "--ip", "10.77.0.10", "--name", "plain", IMAGE, "sleep", "3600")
    docker("run", "-d", "--network", "shaped", "--ip", "10.77.0.11", "--label", "netplugin.egress=30mbit",
           "--name", "labelled", IMAGE, "sleep", "3600")
    wait_until(lambda: physnet.leaf_rates() == [30_000_000, 80_000_000], 10.0, "the label's class", interval=0.1)
    got = _iperf_mbit(physnet, docker, "labelled")
    print(f"label 30mbit: {got:.1f} Mbit/s")
    assert abs(got - 30) <= 3, got
    endpoint = docker("inspect", "-f", "{{.NetworkSettings.Networks.shaped.EndpointID}}", "labelled").stdout.strip()
    assert _status(p)[endpoint]["egress"] == "30mbit (label)"

    # per-endpoint driver option through `docker network connect`
    docker("create", "--network", "shaped", "--ip", "10.77.0.12", "--name", "opt", IMAGE, "sleep", "3600")
    docker("network", "disconnect", "shaped", "opt")
    docker("network", "connect", "--ip", "10.77.0.12", "--driver-opt", "egress=20mbit", "shaped", "opt")
    docker("start", "opt")
    wait_until(lambda: 20_000_000 in physnet.leaf_rates(), 10.0, "the option's class", interval=0.1)

    # a live change on the running container, by name, through the CLI
    shape = subprocess.run([sys.executable, "-m", "netplugin", "shape", "labelled", "--egress", "10mbit",
                            "--socket", str(p.socket), "--docker-host", dockerd.host, "--config", str(p.config)],
                           capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
    assert shape.returncode == 0, shape.stderr
    assert "egress 10mbit (admin)" in shape.stdout, shape.stdout
    got = _iperf_mbit(physnet, docker, "labelled")
    print(f"after netplugin shape 10mbit: {got:.1f} Mbit/s")
    assert abs(got - 10) <= 1, got
    bad = subprocess.run([sys.executable, "-m", "netplugin", "shape", "labelled", "--egress", "lots",
                          "--socket", str(p.socket), "--docker-host", dockerd.host], capture_output=True,
                         text=True, timeout=60, cwd=REPO_ROOT)
    assert bad.returncode == 2 and "not a rate" in bad.stderr, bad.stderr

    docker("rm", "-f", "plain", "labelled", "opt")
    assert physnet.leaf_rates() == []
    docker("network", "rm", "shaped")
    mangle = physnet.lab.sh(physnet.hosta, ["iptables", "-t", "mangle", "-S"]).stdout
    assert tc.CHAIN not in mangle
    assert "htb" not in physnet.lab.sh(physnet.hosta, ["tc", "qdisc", "show", "dev", "eth1"]).stdout

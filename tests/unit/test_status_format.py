"""`netplugin status` and `volplugin status`: tables, sizes, and drift found from a state whose kernel
objects do not exist (read-only against the kernel: nothing is created)."""
import io
import json
import subprocess
import sys

from netplugin import config as netconfig
from netplugin import status as netstatus
from netplugin.service import Services
from netplugin.state import READY, Endpoint, Network
from plugincore.table import table
from volplugin import status as volstatus

NET = "f0" * 32
EP = "f1" * 32


def test_table_and_sizes():
    assert table(["A", "LONGER"], [["x", None], ["yyyy", 3]]).splitlines() == \
        ["A     LONGER", "x     -", "yyyy  3"]
    assert table(["A"], []).splitlines() == ["A", "(none)"]
    assert netstatus.pool_size("10.77.0.0/24") == 254
    assert netstatus.pool_size("10.77.0.0/31") == 2
    assert netstatus.pool_size("fd00::/64") == 2**64
    assert volstatus.human(10 * 2**30) == "10.0 GiB" and volstatus.human(512) == "512 B"
    assert volstatus.human(None) == ""


def _state_with_phantom_network(tmp_path):
    config = netconfig.load(overrides={"state_dir": str(tmp_path)}, environ={})
    services = Services(config)
    state = services.driver.state
    state.claim_network(Network(
        id=NET, mode="static", status=READY, parent="npphantom0",
        options={"parent": "npphantom0", "mtu": 1500, "internal": False, "egress": 30_000_000},
        ipv4=[{"Pool": "10.99.0.0/24", "Gateway": "10.99.0.1/24"}],
        kernel={"bridge": "npb-" + NET[:11], "uplink": "npphantom0"}))
    state.put_endpoint(Endpoint(id=EP, network_id=NET, address="10.99.0.5/24", mac="02:4e:0a:63:00:05"))
    state.set_endpoint_join(EP, "/var/run/docker/netns/abcdef123456", {"host_if": "npe-" + EP[:11]})
    return config, services


def test_netplugin_status_reports_drift_and_rates(tmp_path):
    _, services = _state_with_phantom_network(tmp_path)
    report = netstatus.collect(services, docker_host="")
    net, ep = report["networks"][0], report["endpoints"][0]
    assert (net["mode"], net["bridge"], net["gateway"], net["subnets"]) == \
        ("static", "npb-" + NET[:11], "10.99.0.1", ["10.99.0.0/24"])
    assert ep["egress"] == "30mbit (network)" and ep["joined"] and ep["container"] is None
    drift = "\n".join(report["drift"])
    assert f"bridge npb-{NET[:11]} missing in kernel" in drift
    assert f"host veth npe-{EP[:11]} missing in kernel" in drift
    assert "FORWARD chain" in drift  # the state expects the bridge's rule
    out = io.StringIO()
    netstatus.render(report, out)
    text = out.getvalue()
    assert "sandbox abcdef123456" in text and "30mbit (network)" in text and "DRIFT" in text
    assert f"{NET[:12]}" in text


def test_netplugin_status_cli_json(tmp_path):
    _state_with_phantom_network(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "netplugin", "status", "--json", "--state-dir", str(tmp_path),
                           "--docker-host", f"unix://{tmp_path}/docker.sock"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert [e["id"] for e in report["endpoints"]] == [EP]
    assert report["docker"]["error"] == f"no dockerd socket at {tmp_path}/docker.sock"  # names missing, no failure
    assert report["cluster"]["store"] == "local" and report["pools"] == []


def test_volplugin_render():
    report = {"unreachable": {}, "drift": ["volume db: recorded mount /m/db missing in kernel"], "host_id": "a",
              "pools": [{"vg": "vg0", "thin_pool": "tp", "size": 2**30, "provisioned": 2**29, "overcommit": 0.5,
                         "data_percent": 85.0, "metadata_percent": 10.5, "warning": "thin pool vg0/tp is 85% full"}],
              "volumes": [{"name": "db", "backend": "lvm", "size": 2**30, "used": 2**20, "allocated_percent": 12.5,
                           "fs": "xfs", "pool": "vg0/tp", "holder": "a", "containers": ["c" * 64, "d" * 64],
                           "snapshots": ["s1"], "mountpoint": "", "error": ""}]}
    out = io.StringIO()
    volstatus.render(report, out)
    lines = out.getvalue().splitlines()
    assert lines[0].split() == ["VOLUME", "BACKEND", "SIZE", "USED", "FS", "POOL", "HOLDER", "CONTAINERS",
                                "SNAPSHOTS", "MOUNTPOINT"]
    assert lines[1].startswith("db  ") and "1.0 MiB (12.5% alloc)" in lines[1]
    assert f"{'c' * 12},{'d' * 12}" in lines[1]
    assert "thin pool vg0/tp: data 85%, metadata 10.5%, provisioned 0.5x" in lines[2]
    assert lines[3] == "WARNING: thin pool vg0/tp is 85% full"
    assert "DRIFT" in lines[5] and "missing in kernel" in lines[6]

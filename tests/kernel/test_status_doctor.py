"""`netplugin status` on a real network and endpoint made through the driver (in a throwaway netns, its
--json parsed, drift shown once the kernel loses a link), and `netplugin doctor` as a process against a
live plugin socket (OK) and a missing one (FAIL with the fix)."""
import json
import subprocess
import sys

import pytest
from pyroute2 import IPRoute

from netplugin import config as netconfig
from netplugin.service import Services
from tests.kernel.conftest import plug_container
from tests.lab import REPO_ROOT
from tests.lab.plugin import Plugin

pytestmark = pytest.mark.kernel
NET = "d1" * 32
EP = "d2" * 32
IPV4 = [{"AddressSpace": "local", "Pool": "10.77.0.0/24", "Gateway": "10.77.0.1/24"}]


def cli(*args, config=None):
    """The CLI as a process: forked from the test thread, so in the lab's network namespace."""
    argv = [sys.executable, "-m", "netplugin", *args] + (["--config", str(config)] if config else [])
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)


def test_status_shows_network_endpoint_rates_and_drift(lab, tmp_path):
    state_dir = tmp_path / "state"
    driver = Services(netconfig.load(overrides={"state_dir": str(state_dir)}, environ={})).driver
    driver.create_network(NET, {"com.docker.network.generic": {"parent": "eth1", "ingress": "20mbit"}}, IPV4, [])
    plug_container(lab, driver, NET, EP, "10.77.0.10", {"egress": "30mbit"})
    try:
        proc = cli("status", "--json", "--state-dir", str(state_dir), "--docker-host", "")
        assert proc.returncode == 0, proc.stderr
        report = json.loads(proc.stdout)
        [net], [ep], [pool] = report["networks"], report["endpoints"], report["pools"] or [None]
        assert (net["id"], net["mode"], net["parent"], net["bridge"], net["gateway"], net["subnets"]) == \
            (NET, "static", "eth1", "npb-" + NET[:11], "10.77.0.1", ["10.77.0.0/24"])
        assert (ep["id"], ep["address"], ep["mac"], ep["interface"], ep["joined"]) == \
            (EP, "10.77.0.10/24", "02:4e:0a:4d:00:0a", "npe-" + EP[:11], True)
        assert (ep["egress"], ep["ingress"]) == ("30mbit (option)", "20mbit (network)")
        assert report["drift"] == [], "the kernel matches the state: the classes, TBF and FORWARD rule are there"
        assert pool is None  # Docker's built-in IPAM here: no pool of ours

        text = cli("status", "--state-dir", str(state_dir), "--docker-host", "").stdout
        assert "npb-" + NET[:11] in text and "30mbit (option)" in text and "as the state says" in text

        with IPRoute() as ipr:  # behind the plugin's back: the host end of the veth goes
            ipr.link("del", ifname="npe-" + EP[:11])
        report = json.loads(cli("status", "--json", "--state-dir", str(state_dir), "--docker-host", "").stdout)
        assert report["endpoints"][0]["drift"] == [f"host veth npe-{EP[:11]} missing in kernel"]
        assert "DRIFT" in cli("status", "--state-dir", str(state_dir), "--docker-host", "").stdout
    finally:
        driver.leave(NET, EP)
        driver.delete_endpoint(NET, EP)
        driver.delete_network(NET)


def _config(path, socket, state_dir):
    path.write_text(f'socket = "{socket}"\nstate_dir = "{state_dir}"\ndocker_host = "unix://{path.parent}/no.sock"\n'
                    "labels = false\n")
    return path


def test_doctor_against_a_live_and_a_missing_socket(lab, tmp_path):
    plugin = Plugin(lab.host, tmp_path / "plugin").start()
    try:
        config = _config(tmp_path / "live.toml", plugin.socket, plugin.state_dir)
        proc = cli("doctor", "--json", config=config)
        checks = {c["name"]: c for c in json.loads(proc.stdout)["checks"]}
        assert checks[f"socket {plugin.socket}"]["status"] == "OK", checks
        assert checks["plugin answers"]["status"] == "OK"
        assert checks["plugin answers"]["detail"] == "/Plugin.Activate: NetworkDriver, IpamDriver"
        assert checks["discovery by dockerd"]["status"] == "OK"
        assert checks["kernel: veth"]["status"] == checks["kernel: bridge"]["status"] == "OK"
        assert checks["kernel: vlan"]["status"] in ("OK", "WARN")  # no VLAN network: never a FAIL
        assert proc.returncode == (1 if any(c["status"] == "FAIL" for c in checks.values()) else 0)

        text = cli("doctor", config=config).stdout
        assert f"OK    socket {plugin.socket}: mode 0600, owned by root" in text
    finally:
        plugin.destroy()

    missing = _config(tmp_path / "missing.toml", tmp_path / "nothing.sock", tmp_path / "state")
    proc = cli("doctor", config=missing)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    i = lines.index(f"FAIL  socket {tmp_path}/nothing.sock: does not exist: the plugin is not running")
    assert lines[i + 1] == "      fix: start the plugin: netplugin serve [--config FILE] (or its service)"

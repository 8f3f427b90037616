"""Rate limits through the driver on a static network, against the real kernel with real traffic
(iperf3 from "container" namespaces to the lab's router across the emulated parent NIC)."""
from __future__ import annotations

import json
import subprocess
import time

import pytest
from pyroute2 import IPRoute

from netplugin import config as netconfig
from netplugin.kernel import shaping as tc
from netplugin.reconcile import reconcile
from netplugin.service import Services
from plugincore.errors import InvalidRequest
from tests.kernel.conftest import plug_container

pytestmark = pytest.mark.kernel
NET = "5e" * 32
IPV4 = [{"AddressSpace": "local", "Pool": "10.77.0.0/24", "Gateway": "10.77.0.1/24"}]
ROUTER = "10.77.0.1"
TOLERANCE = 0.10


@pytest.fixture
def driver(lab, tmp_path):
    return Services(netconfig.load(overrides={"state_dir": str(tmp_path / "state")}, environ={})).driver


def _network(driver, **generic):
    driver.create_network(NET, {"com.docker.network.generic": {"parent": "eth1", **generic}}, IPV4, [])


def _iperf(lab, sandbox, port, seconds=4, reverse=False, interval=None, omit=1):
    """Start iperf3 server (router) + client (sandbox); returns the client Popen (JSON on stdout)."""
    server = ["iperf3", "-s", "-1", "-p", str(port)] + (["-J", "-i", str(interval)] if interval else [])
    subprocess.Popen(["ip", "netns", "exec", lab.router, *server], stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL)
    time.sleep(0.3)
    argv = ["ip", "netns", "exec", sandbox, "iperf3", "-c", ROUTER, "-p", str(port), "-t", str(seconds),
            "-O", str(omit), "-J"]
    if reverse:
        argv.append("-R")
    if interval:  # the receiver's intervals are smooth; the sender's jump with its socket buffer
        argv += ["-i", str(interval), "--get-server-output"]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _mbit(proc) -> float:
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, f"iperf3 failed: {err} {out[-300:]}"
    return json.loads(out)["end"]["sum_received"]["bits_per_second"] / 1e6


def _near(measured: float, limit: float) -> bool:
    return abs(measured - limit) <= limit * TOLERANCE


def test_endpoint_option_limits_one_container_and_not_its_neighbour(lab, driver):
    _network(driver)
    shaped, _, _ = plug_container(lab, driver, NET, "e1" * 32, "10.77.0.10", {"egress": "40mbit"})
    free, _, _ = plug_container(lab, driver, NET, "e2" * 32, "10.77.0.11")
    a, b = _iperf(lab, shaped, 5301), _iperf(lab, free, 5302)
    got_a, got_b = _mbit(a), _mbit(b)
    print(f"shaped at 40mbit: {got_a:.1f} Mbit/s; unshaped neighbour at the same time: {got_b:.1f} Mbit/s")
    assert _near(got_a, 40), got_a
    assert got_b > 100, "the unshaped neighbour is not held back"
    assert driver.oper_info(NET, "e1" * 32)["egress"] == "40mbit (option)"


def test_live_change_takes_effect_within_a_second_without_dropping_the_connection(lab, driver):
    _network(driver)
    shaped, _, _ = plug_container(lab, driver, NET, "e3" * 32, "10.77.0.12", {"egress": "60mbit"})
    client = _iperf(lab, shaped, 5303, seconds=7, interval=0.5, omit=0)  # omit would shift the timeline
    time.sleep(3.0)
    changed_at, changed_wall = time.monotonic(), time.time()
    reply = driver.shape("e3" * 6, "15mbit", None)
    print(f"shape call: {(time.monotonic() - changed_at) * 1000:.0f} ms")
    assert reply["egress"] == "15mbit (admin)"
    out, err = client.communicate(timeout=60)
    assert client.returncode == 0, f"the connection survived the change: {err}"
    result = json.loads(out)["server_output_json"]
    offset = changed_wall - result["start"]["timestamp"]["timesecs"]  # the change, in iperf's time
    intervals = [(i["sum"]["start"], i["sum"]["end"], i["sum"]["bits_per_second"] / 1e6)
                 for i in result["intervals"] if i["sum"]["end"] - i["sum"]["start"] > 0.4]
    before = [r for start, end, r in intervals if start >= 1.0 and end <= offset - 0.2]  # past slow start
    after = [r for start, end, r in intervals if start >= offset + 1.0]  # from 1 s after the change
    print(f"change at {offset:.2f} s; before {[round(r) for r in before]}, after {[round(r, 1) for r in after]}")
    assert before and sum(before) / len(before) > 40, f"at about 60mbit before the change: {before}"
    assert after and _near(sum(after) / len(after), 15), after
    assert all(r < 15 * 1.2 for r in after), f"every half second from 1 s after the change: {after}"


def test_precedence_admin_label_option_network(lab, driver):
    _network(driver, egress="20mbit")
    plug_container(lab, driver, NET, "e4" * 32, "10.77.0.13", {"egress": "30mbit"})
    plug_container(lab, driver, NET, "e5" * 32, "10.77.0.14")
    assert driver.oper_info(NET, "e4" * 32)["egress"] == "30mbit (option)"
    assert driver.oper_info(NET, "e5" * 32)["egress"] == "20mbit (network)"
    driver.set_rates("e4" * 32, "label", {"egress": 25_000_000, "ingress": None})
    assert driver.oper_info(NET, "e4" * 32)["egress"] == "25mbit (label)"
    driver.shape("e4" * 32, "10mbit", "5mbit")
    info = driver.oper_info(NET, "e4" * 32)
    assert (info["egress"], info["ingress"]) == ("10mbit (admin)", "5mbit (admin)")
    with IPRoute() as ipr:
        assert sorted(tc.classes(ipr, "eth1").values()) == [10_000_000, 20_000_000]
    driver.shape("e4" * 32, None, None, clear=True)
    assert driver.oper_info(NET, "e4" * 32)["egress"] == "25mbit (label)"
    with pytest.raises(InvalidRequest, match="not a rate"):
        driver.shape("e4" * 32, "fast", None)
    with pytest.raises(InvalidRequest, match="not a rate"):
        driver.create_endpoint(NET, "e6" * 32, {"Address": "10.77.0.15/24"}, {"egress": "-1mbit"})
    assert driver.oper_info(NET, "e4" * 32)["egress"] == "25mbit (label)", "a bad value changed nothing"


def test_ingress_limit(lab, driver):
    _network(driver)
    shaped, _, _ = plug_container(lab, driver, NET, "e7" * 32, "10.77.0.16", {"ingress": "25mbit"})
    got = _mbit(_iperf(lab, shaped, 5304, reverse=True))
    print(f"ingress limited at 25mbit: {got:.1f} Mbit/s")
    assert _near(got, 25), got


def test_removal_leaves_nothing_and_reconcile_rebuilds(lab, driver):
    _network(driver)
    plug_container(lab, driver, NET, "e8" * 32, "10.77.0.17", {"egress": "30mbit"})
    plug_container(lab, driver, NET, "e9" * 32, "10.77.0.18", {"egress": "35mbit"})
    # a reboot's worth of loss: qdisc and set contents gone
    subprocess.run(["tc", "qdisc", "del", "dev", "eth1", "root"], check=True)
    tc.set_entries({})
    summary = reconcile(driver)
    assert summary["shaped_endpoints"] == 2
    with IPRoute() as ipr:
        assert sorted(tc.classes(ipr, "eth1").values()) == [30_000_000, 35_000_000]
    assert sorted(tc.entries()) == ["10.77.0.17", "10.77.0.18"]
    driver.shape("e8" * 32, "12mbit", None)
    # e9 vanishes from state while the plugin is down (e.g. a restored backup): its class and set entry
    # go at the next start; e8's live override stays
    driver.state.drop_endpoint("e9" * 32)
    reconcile(driver)
    with IPRoute() as ipr:
        assert list(tc.classes(ipr, "eth1").values()) == [12_000_000]
    assert sorted(tc.entries()) == ["10.77.0.17"]
    assert driver.oper_info(NET, "e8" * 32)["egress"] == "12mbit (admin)"
    for ep in ("e8" * 32, "e9" * 32):
        driver.leave(NET, ep)
        driver.delete_endpoint(NET, ep)
    with IPRoute() as ipr:
        assert tc.classes(ipr, "eth1") == {}
    assert tc.entries() == {}
    driver.delete_network(NET)
    qdisc = subprocess.run(["tc", "qdisc", "show", "dev", "eth1"], capture_output=True, text=True).stdout
    assert "htb" not in qdisc, qdisc
    mangle = subprocess.run(["iptables", "-t", "mangle", "-S"], capture_output=True, text=True).stdout
    assert tc.CHAIN not in mangle, mangle
    sets = subprocess.run(["ipset", "list", "-n"], capture_output=True, text=True).stdout.split()
    assert tc.SET_NAME not in sets


def test_repeated_create_endpoint_is_idempotent_or_refused_and_leaks_nothing(lab, driver):
    """Found by tests/kernel/test_fuzz_netplugin.py: a second CreateEndpoint with the same ID replaced the
    joined endpoint's record, and its traffic class and set entry stayed in the kernel for good."""
    from plugincore.errors import Conflict
    _network(driver)
    ep = "e9" * 32
    first = driver.create_endpoint(NET, ep, {"Address": "10.77.0.5/24"}, {"egress": "5mbit"})
    driver.join(NET, ep, "/var/run/docker/netns/x")
    assert list(tc.entries()) == ["10.77.0.5"]
    assert driver.create_endpoint(NET, ep, {"Address": "10.77.0.5/24"}, {"egress": "5mbit"}) == first
    with pytest.raises(Conflict, match="already exists with other settings"):
        driver.create_endpoint(NET, ep, {"Address": "10.77.0.6/24"}, {"egress": "5mbit"})
    assert driver.state.get_endpoint(ep).sandbox, "the joined endpoint is untouched"
    driver.leave(NET, ep)
    driver.delete_endpoint(NET, ep)
    driver.delete_network(NET)
    sets = subprocess.run(["ipset", "list", "-o", "save"], capture_output=True, text=True, check=True).stdout
    assert not [ln for ln in sets.splitlines() if ln.startswith("add ")], sets
    assert "NETPLUGIN" not in subprocess.run(["iptables-save", "-t", "mangle"], capture_output=True, text=True,
                                             check=True).stdout

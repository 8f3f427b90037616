"""Static mode against the real kernel, in throwaway namespaces (no Docker: the test plays Docker's
part of moving the container end into a "container" netns)."""
import subprocess

import pytest
from pyroute2 import IPRoute

from netplugin import config as netconfig
from netplugin.kernel import firewall, links
from netplugin.reconcile import reconcile
from netplugin.service import Services
from plugincore.errors import Conflict, InvalidRequest
from tests.kernel.conftest import plug_container

pytestmark = pytest.mark.kernel
NET = "a1" * 32
EP = "e1" * 32
IPV4 = [{"AddressSpace": "local", "Pool": "10.77.0.0/24", "Gateway": "10.77.0.1/24"}]


def _opts(**generic):
    return {"com.docker.network.generic": generic}


@pytest.fixture
def driver(lab, tmp_path):
    return Services(netconfig.load(overrides={"state_dir": str(tmp_path / "state")})).driver


def _link(name):
    with IPRoute() as ipr:
        return links.get_link(ipr, name)


def _owned_links():
    with IPRoute() as ipr:
        return sorted(link.name for link in links.list_links(ipr) if link.name.startswith("np"))


def _in_ns(ns, *argv, check=True):
    return subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True,
                          timeout=20, check=check)


def _plug_container(lab, driver, endpoint_id, address):
    return plug_container(lab, driver, NET, endpoint_id, address)


def test_container_reaches_router_without_nat(lab, driver):
    driver.create_network(NET, _opts(parent="eth1"), IPV4, [])
    bridge, parent = _link("npb-" + NET[:11]), _link("eth1")
    assert bridge.kind == "bridge" and parent.master == bridge.index
    assert bridge.mac == parent.mac, "bridge MAC must be pinned to the parent's"
    assert firewall.forward_rules() == [f"-A NETPLUGIN-FORWARD -i {bridge.name} -o {bridge.name} -j ACCEPT"]

    sandbox, reply, join = _plug_container(lab, driver, EP, "10.77.0.10")
    assert reply == {"Interface": {"MacAddress": "02:4e:0a:4d:00:0a"}}
    assert join["Gateway"] == "10.77.0.1" and join["InterfaceName"]["DstPrefix"] == "eth"
    assert _link("npe-" + EP[:11]).master == bridge.index

    subprocess.run(["iptables", "-P", "FORWARD", "DROP"], check=True)  # as Docker sets it
    _in_ns(sandbox, "ping", "-c", "1", "-W", "2", "10.77.0.1")
    neigh = _in_ns(lab.router, "ip", "neigh", "show", "10.77.0.10").stdout
    assert "02:4e:0a:4d:00:0a" in neigh, "the router must see the container itself (no NAT, no proxy)"
    assert "MASQUERADE" not in subprocess.run(["iptables-save"], capture_output=True, text=True).stdout

    driver.leave(NET, EP)
    driver.delete_endpoint(NET, EP)
    assert _owned_links() == ["npb-" + NET[:11]]
    driver.delete_network(NET)
    assert _owned_links() == [] and _link("eth1").master is None
    assert firewall.forward_rules() == []
    driver.delete_network(NET)  # unknown now: still a success
    driver.leave(NET, EP)
    driver.delete_endpoint(NET, EP)


def test_two_containers_reach_each_other(lab, driver):
    driver.create_network(NET, _opts(parent="eth1"), IPV4, [])
    subprocess.run(["iptables", "-P", "FORWARD", "DROP"], check=True)
    first, _, _ = _plug_container(lab, driver, "c1" * 32, "10.77.0.11")
    _plug_container(lab, driver, "c2" * 32, "10.77.0.12")
    _in_ns(first, "ping", "-c", "1", "-W", "2", "10.77.0.12")
    driver.delete_network(NET)
    assert _owned_links() == []


@pytest.mark.parametrize("generic, error, message", [
    ({}, InvalidRequest, "needs -o parent"),
    ({"parent": "nope0"}, InvalidRequest, "does not exist"),
    ({"parent": "bad name!"}, InvalidRequest, "not a valid interface name"),
    ({"parent": "eth1", "com.docker.network.driver.mtu": "abc"}, InvalidRequest, "not a number"),
    ({"parent": "eth1", "com.docker.network.driver.mtu": "9000"}, InvalidRequest, "exceeds parent"),
    ({"parent": "eth1", "colour": "blue"}, InvalidRequest, "unknown network option colour"),
    ({"parent": "eth1", "mode": "warp"}, InvalidRequest, "unknown mode"),
    ({"parent": "lo"}, InvalidRequest, "loopback"),
])
def test_bad_input_changes_nothing(lab, driver, generic, error, message):
    with pytest.raises(error, match=message):
        driver.create_network(NET, _opts(**generic), IPV4, [])
    assert _owned_links() == [] and driver.state.networks() == []


def test_parent_with_address_or_in_use_is_refused(lab, driver):
    with IPRoute() as ipr:
        ipr.addr("add", index=ipr.link_lookup(ifname="eth1")[0], address="192.0.2.5", prefixlen=24)
    with pytest.raises(InvalidRequest, match="carries IP addresses"):
        driver.create_network(NET, _opts(parent="eth1"), IPV4, [])
    with IPRoute() as ipr:
        ipr.addr("del", index=ipr.link_lookup(ifname="eth1")[0], address="192.0.2.5", prefixlen=24)
    driver.create_network(NET, _opts(parent="eth1"), IPV4, [])
    with pytest.raises(Conflict, match="already used by another netplugin network"):
        driver.create_network("b2" * 32, _opts(parent="eth1"), IPV4, [])
    assert [n.id for n in driver.state.networks()] == [NET]
    driver.delete_network(NET)


def test_parent_given_back_as_it_was(lab, driver):
    assert not _link("eth1").up
    driver.create_network(NET, _opts(parent="eth1", **{"com.docker.network.driver.mtu": "1400"}), IPV4, [])
    assert _link("eth1").up and _link("npb-" + NET[:11]).mtu == 1400
    driver.delete_network(NET)
    parent = _link("eth1")
    assert not parent.up and parent.master is None and parent.mtu == 1500


def test_failed_create_is_rolled_back(lab, driver, monkeypatch):
    def broken(bridges):
        raise RuntimeError("iptables exploded")
    monkeypatch.setattr(firewall, "sync_forward_rules", broken)
    with pytest.raises(RuntimeError):
        driver.create_network(NET, _opts(parent="eth1"), IPV4, [])
    monkeypatch.undo()
    assert _owned_links() == [] and _link("eth1").master is None and driver.state.networks() == []


def test_reconcile_repairs_and_removes_orphans(lab, driver):
    driver.create_network(NET, _opts(parent="eth1"), IPV4, [])
    driver.create_endpoint(NET, EP, {"Address": "10.77.0.10/24"}, {})
    driver.join(NET, EP, "/var/run/docker/netns/x")
    with IPRoute() as ipr:
        links.remove_link(ipr, "npb-" + NET[:11])  # someone deleted our bridge
        ipr.link("add", ifname="npe-deadbeef000", kind="veth", peer="npc-deadbeef000")  # a crash leftover
    subprocess.run(["iptables", "-F", "NETPLUGIN-FORWARD"], check=True)
    summary = reconcile(driver)
    assert summary["orphan_links"] == 2 and summary["repaired_endpoints"] == 1
    bridge = _link("npb-" + NET[:11])
    assert _link("eth1").master == bridge.index and _link("npe-" + EP[:11]).master == bridge.index
    assert len(firewall.forward_rules()) == 1
    driver.delete_network(NET)
    assert _owned_links() == []


def test_reconcile_undoes_interrupted_create(lab, driver):
    driver.create_network(NET, _opts(parent="eth1"), IPV4, [])
    driver.state.set_network_status(NET, "creating")  # as if the plugin died before finishing
    reconcile(driver)
    assert driver.state.networks() == [] and _owned_links() == [] and _link("eth1").master is None

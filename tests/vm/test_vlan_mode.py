"""VLAN mode against a full kernel (8021q exists only in the VM lane): two hosts joined by a trunk
cable, tenants on VLAN 100 and 200 in the SAME subnet, so only 802.1Q keeps them apart."""
import subprocess

import pytest
from pyroute2 import IPRoute

from netplugin import config as netconfig
from netplugin.kernel import links, shaping as tc
from netplugin.service import Services
from plugincore.errors import Conflict, InvalidRequest
from tests.kernel.conftest import lab, plug_container  # noqa: F401 - the kernel tests' namespace fixture
from tests.lab.iperf import tcp_mbit
from tests.lab.netns import entered

SUBNET = [{"AddressSpace": "local", "Pool": "10.78.0.0/24", "Gateway": "10.78.0.1/24"}]


def _needs_8021q():
    if subprocess.run(["modprobe", "8021q"], capture_output=True).returncode != 0:
        pytest.skip("needs the 8021q module: runs in the VM lane (scripts/test-vm)")


@pytest.fixture
def trunk(lab, tmp_path):  # noqa: F811
    """Host A = the lab's host netns (eth1), host B = the lab's router netns, whose end of the cable
    (r0) is renamed eth1: one trunk between two Docker hosts, each with its own plugin state."""
    _needs_8021q()
    with IPRoute(netns=lab.router) as ipr:
        idx = ipr.link_lookup(ifname="r0")[0]
        ipr.flush_addr(index=idx)
        ipr.link("set", index=idx, state="down")
        ipr.link("set", index=idx, ifname="eth1")
    a = Services(netconfig.load(overrides={"state_dir": str(tmp_path / "a")}, environ={})).driver
    b = Services(netconfig.load(overrides={"state_dir": str(tmp_path / "b")}, environ={})).driver
    return a, b


def _opts(vlan, parent="eth1"):
    return {"com.docker.network.generic": {"mode": "vlan", "parent": parent, "vlan": str(vlan)}}


def _container(lab, driver, net, ep, address, options=None):
    return plug_container(lab, driver, net, ep, address, options)[0]


def _ping(ns, address) -> bool:
    return subprocess.run(["ip", "netns", "exec", ns, "ping", "-c", "1", "-W", "1", address],
                          capture_output=True, timeout=20).returncode == 0


def test_vlans_connect_across_hosts_and_isolate_tenants(lab, trunk):  # noqa: F811
    a, b = trunk
    net100, net200 = "a100" * 16, "a200" * 16
    subprocess.run(["sysctl", "-qw", "net.ipv4.ip_forward=1"], check=True)  # even a routing host...
    a.create_network(net100, _opts(100), SUBNET, [])
    a.create_network(net200, _opts(200), SUBNET, [])
    a1 = _container(lab, a, net100, "e11" * 21 + "e", "10.78.0.11")
    a2 = _container(lab, a, net200, "e12" * 21 + "e", "10.78.0.12")
    with entered(lab.router):
        b.create_network(net100, _opts(100), SUBNET, [])
        b.create_network(net200, _opts(200), SUBNET, [])
        b1 = _container(lab, b, net100, "e21" * 21 + "e", "10.78.0.21")
        b2 = _container(lab, b, net200, "e22" * 21 + "e", "10.78.0.22")
    assert _ping(a1, "10.78.0.21") and _ping(a2, "10.78.0.22"), "same VLAN, two hosts: connected"
    assert not _ping(a1, "10.78.0.22") and not _ping(a1, "10.78.0.12"), "...different VLANs: isolated"
    assert not _ping(b2, "10.78.0.11")
    assert _link("eth1.100") is not None and _link("eth1.200") is not None
    a.delete_network(net100)
    a.delete_network(net200)
    assert _link("eth1.100") is None and _link("eth1.200") is None, "created sub-interfaces removed"
    assert _link("eth1").up
    with entered(lab.router):
        b.delete_network(net100)
        b.delete_network(net200)


def test_egress_limit_on_a_vlan_network(lab, trunk):  # noqa: F811
    """The HTB class sits on the VLAN sub-interface (the bridge's uplink), not on the trunk NIC."""
    a, b = trunk
    net = "a300" * 16
    a.create_network(net, {"com.docker.network.generic": {"mode": "vlan", "parent": "eth1", "vlan": "300",
                                                          "egress": "20mbit"}}, SUBNET, [])
    a1 = _container(lab, a, net, "e31" * 21 + "e", "10.78.0.31")
    with entered(lab.router):
        b.create_network(net, _opts(300), SUBNET, [])
        b1 = _container(lab, b, net, "e32" * 21 + "e", "10.78.0.32")
    with IPRoute() as ipr:
        assert list(tc.classes(ipr, "eth1.300").values()) == [20_000_000]
    got = tcp_mbit(b1, a1, "10.78.0.32", 5430, timeout=120, settle=1.0)  # slow under emulation
    print(f"vlan container limited at 20mbit: {got:.1f} Mbit/s")
    assert abs(got - 20) <= 2, got
    a.delete_network(net)
    with entered(lab.router):
        b.delete_network(net)


def _link(name):
    with IPRoute() as ipr:
        return links.get_link(ipr, name)


def test_existing_subinterface_is_borrowed_and_kept(lab, trunk):  # noqa: F811
    a, _ = trunk
    with IPRoute() as ipr:
        ipr.link("add", ifname="eth1.300", kind="vlan", link=ipr.link_lookup(ifname="eth1")[0], vlan_id=300)
    a.create_network("b300" * 16, _opts(300), SUBNET, [])
    assert _link("eth1.300").master is not None
    with pytest.raises(Conflict, match="eth1.300 is already used"):
        a.create_network("c300" * 16, _opts(300), SUBNET, [])
    a.delete_network("b300" * 16)
    kept = _link("eth1.300")
    assert kept is not None and kept.master is None and not kept.up


@pytest.mark.parametrize("vlan, message", [("0", "not a VLAN id"), ("4095", "not a VLAN id"),
                                          ("abc", "not a VLAN id"), (None, "needs -o vlan")])
def test_bad_vlan_changes_nothing(lab, tmp_path, vlan, message):  # noqa: F811
    # Validation needs no 8021q: this one runs on the host too.
    a = Services(netconfig.load(overrides={"state_dir": str(tmp_path / "a")}, environ={})).driver
    generic = {"mode": "vlan", "parent": "eth1"} | ({"vlan": vlan} if vlan is not None else {})
    with pytest.raises(InvalidRequest, match=message):
        a.create_network("d400" * 16, {"com.docker.network.generic": generic}, SUBNET, [])
    with IPRoute() as ipr:
        assert sorted(l.name for l in links.list_links(ipr)) == ["eth1", "lo"]

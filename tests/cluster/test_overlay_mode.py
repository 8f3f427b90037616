"""Overlay mode across two emulated hosts against the real kernel and a real etcd (no Docker: the test
plays Docker's part of moving each container end into a "container" netns).

    hosta (eth0 192.168.90.1) --+
                                +-- switch netns: bridge + etcd on 192.168.90.254
    hostb (eth0 192.168.90.2) --+

Each host has its own driver instance and state directory, both pointing at the etcd (host ids
"hosta"/"hostb"). Driver calls for a host run with the test thread inside that host's netns, so
pyroute2 sockets and etcd connections are made there.
"""
from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest
from pyroute2 import IPRoute

from netplugin import config as netconfig
from netplugin.cluster.etcd import ClusterUnavailable
from netplugin.kernel import names, shaping as tc, vxlan
from netplugin.overlay_agent import OverlayAgent
from netplugin.reconcile import reconcile
from netplugin.service import Services
from tests.lab.etcd import EtcdServer, skip_reason
from tests.lab import REPO_ROOT as REPO
from tests.lab.iperf import tcp_mbit
from tests.lab.netns import Lab, entered

SUBNET, SUBNET2 = "10.88.0.0/24", "10.89.0.0/24"
ETCD_IP = "192.168.90.254"


class Host:
    def __init__(self, lab, ns, name, etcd_url, state_dir):
        self.lab, self.ns, self.name = lab, ns, name
        config = netconfig.load(overrides={"state_dir": str(state_dir)}, environ={})
        config["cluster"].update(store="etcd", etcd_endpoints=etcd_url, host_id=name, etcd_timeout=2.0,
                                 etcd_prefix="/ovtest/")
        self.config = config
        self.services = Services(config)
        self.driver = self.services.driver
        self.ipam = self.services.ipam

    def network(self, network_id: str, overlay: str, subnet: str, **more) -> str:
        """What Docker does for `docker network create --ipam-driver netplugin -o mode=overlay ...`."""
        with entered(self.ns):
            pool = self.ipam.request_pool("local", subnet, "", {}, False)
            gateway = self.ipam.request_address(pool["PoolID"], "", {"RequestAddressType":
                                                                      "com.docker.network.gateway"})
            self.driver.create_network(network_id, {"com.docker.network.generic": {
                "mode": "overlay", "overlay": overlay, "parent": "eth0", **more}},
                [{"AddressSpace": "local", "Pool": pool["Pool"], "Gateway": gateway["Address"]}], [])
            return pool["PoolID"]

    def container(self, network_id: str, pool_id: str, endpoint_id: str) -> tuple[str, str, dict]:
        """Address from IPAM, CreateEndpoint, Join, then move/rename/address like Docker. Returns
        (container netns, address, Join reply)."""
        with entered(self.ns):
            address = self.ipam.request_address(pool_id, "", {})["Address"]
            self.driver.create_endpoint(network_id, endpoint_id, {"Address": address}, {})
            join = self.driver.join(network_id, endpoint_id, "/var/run/docker/netns/x")
            src = join["InterfaceName"]["SrcName"]
            sandbox = self.lab.netns(f"c{endpoint_id[:3]}")
            with IPRoute() as ipr:
                ipr.link("set", index=ipr.link_lookup(ifname=src)[0], net_ns_fd=f"/run/netns/{sandbox}")
        with IPRoute(netns=sandbox, flags=0) as ipr:
            idx = ipr.link_lookup(ifname=src)[0]
            ipr.link("set", index=idx, ifname="eth0", state="up")
            ip, prefix = address.split("/")
            ipr.addr("add", index=idx, address=ip, prefixlen=int(prefix))
        return sandbox, address.split("/")[0], join

    def sync(self) -> None:
        with entered(self.ns):
            OverlayAgent(self.services).sync_all()

    def fdb(self, network_id: str) -> dict:
        with entered(self.ns), IPRoute() as ipr:
            return vxlan.fdb_entries(ipr, names.vxlan_name(network_id))


@pytest.fixture
def cluster(tmp_path):
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    lab = Lab()
    server = None
    try:
        sw, ha, hb = lab.netns("sw"), lab.netns("ha"), lab.netns("hb")
        lab.bridge(sw, "br0")
        lab.addr(sw, "br0", f"{ETCD_IP}/24")
        for n, host in ((1, ha), (2, hb)):
            lab.veth(host, "eth0", sw, f"p{n}")
            lab.enslave(sw, f"p{n}", "br0")
            lab.up(sw, f"p{n}")
            lab.addr(host, "eth0", f"192.168.90.{n}/24")
            lab.up(host, "eth0")
        server = EtcdServer(tmp_path / "etcd", netns=sw, address=ETCD_IP).start()
        hosts = [Host(lab, ha, "hosta", server.url, tmp_path / "a"),
                 Host(lab, hb, "hostb", server.url, tmp_path / "b")]
        yield lab, server, hosts
    finally:
        if server is not None:
            server.destroy()
        lab.destroy()


def _ping(lab, ns, address, tries=3) -> bool:
    return any(lab.ping(ns, address, wait=1) for _ in range(tries))


def test_containers_on_two_hosts_reach_each_other_and_nothing_else(cluster):
    lab, _, (a, b) = cluster
    net_a, net_b = "a1" * 32, "b1" * 32
    pool_a = a.network(net_a, "tenant1", SUBNET)
    pool_b = b.network(net_b, "tenant1", SUBNET)
    assert pool_a == pool_b
    ca, ip_a, join = a.container(net_a, pool_a, "ea" * 32)
    cb, ip_b, _ = b.container(net_b, pool_b, "eb" * 32)
    assert ip_a != ip_b, "one address space across hosts"
    assert "Gateway" not in join and join["DisableGatewayService"] is True
    a.sync()
    b.sync()
    assert _ping(lab, ca, ip_b) and _ping(lab, cb, ip_a), "containers of one overlay reach each other"
    vx = names.vxlan_name(net_a)
    with entered(a.ns), IPRoute() as ipr:
        info = vxlan.vxlan_info(ipr, vx)
        mtu = ipr.link("get", ifname=vx)[0].get("mtu")
    assert info["vni"] == 4096 and info["local"] == "192.168.90.1" and not info["learning"]
    assert mtu == 1450, "underlay MTU 1500 minus 50"
    assert a.fdb(net_a) == {"unicast": {names.mac_for(ip_b): "192.168.90.2"}, "flood": {"192.168.90.2"}}

    # another overlay on the same hosts is isolated from the first; so is each host
    net_a2 = "a2" * 32
    pool2 = a.network(net_a2, "tenant2", SUBNET2)
    c2, ip2, _ = a.container(net_a2, pool2, "e2" * 32)
    assert not lab.ping(c2, ip_a) and not lab.ping(c2, ip_b), "tenant2 cannot reach tenant1"
    assert not lab.ping(a.ns, ip_a) and not lab.ping(b.ns, ip_a), "the hosts cannot reach containers"
    assert not lab.ping(ca, "192.168.90.1") and not lab.ping(ca, ETCD_IP), "nor containers the underlay"
    nat = lab.sh(a.ns, ["iptables", "-t", "nat", "-S"]).stdout
    assert "MASQUERADE" not in nat and "SNAT" not in nat, nat
    routes = lab.sh(ca, ["ip", "route"]).stdout
    assert "default" not in routes, routes

    # the last host leaving the overlay frees its VNI
    with entered(a.ns):
        a.driver.leave(net_a, "ea" * 32)
        a.driver.delete_endpoint(net_a, "ea" * 32)
        a.driver.delete_network(net_a)
        assert a.services.overlays.endpoints("tenant1")[0]["host"] == "hostb"
    with entered(b.ns):
        b.driver.leave(net_b, "eb" * 32)
        b.driver.delete_endpoint(net_b, "eb" * 32)
        b.driver.delete_network(net_b)
        assert b.services.etcd.get("overlays/tenant1") is None and b.services.etcd.get("vnis/4096") is None
        assert [n for n in lab.links(b.ns) if n.startswith("np")] == []


def test_agent_follows_remote_endpoints_within_a_second(cluster):
    lab, _, (a, b) = cluster
    net_a, net_b = "a3" * 32, "b3" * 32
    pool = a.network(net_a, "t3", SUBNET)
    b.network(net_b, "t3", SUBNET)
    ca, ip_a, _ = a.container(net_a, pool, "ec" * 32)
    stop = threading.Event()
    with entered(a.ns):
        agent = threading.Thread(target=OverlayAgent(a.services, retry=0.2).run, args=(stop,), daemon=True)
        agent.start()  # inherits hosta's netns
    try:
        time.sleep(1.0)  # its first full pass and watch
        started = time.monotonic()
        cb, ip_b, _ = b.container(net_b, pool, "ed" * 32)
        mac_b = names.mac_for(ip_b)
        while mac_b not in a.fdb(net_a)["unicast"]:
            assert time.monotonic() - started < 5, "host A never learned host B's new endpoint"
            time.sleep(0.02)
        latency = time.monotonic() - started
        print(f"Join on host B -> forwarding entry on host A: {latency * 1000:.0f} ms")
        assert latency < 1.0
        b.sync()
        assert _ping(lab, ca, ip_b)
        with entered(b.ns):
            b.driver.leave(net_b, "ed" * 32)
        deadline = time.monotonic() + 5
        while mac_b in a.fdb(net_a)["unicast"]:
            assert time.monotonic() < deadline, "the removal did not propagate"
            time.sleep(0.02)
    finally:
        stop.set()
        agent.join(10)


def test_etcd_down_clear_errors_no_corruption_and_recovery(cluster):
    lab, server, (a, b) = cluster
    net_a, net_b = "a4" * 32, "b4" * 32
    pool = a.network(net_a, "t4", SUBNET)
    b.network(net_b, "t4", SUBNET)
    b.container(net_b, pool, "ef" * 32)
    server.pause()
    try:
        with entered(a.ns):
            with pytest.raises(ClusterUnavailable, match="cluster store unreachable"):
                a.driver.create_network("a5" * 32, {"com.docker.network.generic": {
                    "mode": "overlay", "overlay": "t5", "parent": "eth0"}},
                    [{"AddressSpace": "local", "Pool": SUBNET2, "Gateway": "10.89.0.1/24"}], [])
            assert a.driver.state.get_network("a5" * 32) is None
            assert names.vxlan_name("a5" * 32) not in lab.links(a.ns), "nothing left by the failed create"
        with entered(b.ns):
            b.driver.leave(net_b, "ef" * 32)  # must not fail: withdrawn once etcd is back
    finally:
        server.resume()
    # A request that timed out may still be carried out once etcd runs again (its bytes were already
    # in the socket): whatever etcd did meanwhile, the agent's next pass settles both leftovers - the
    # failed create's overlay membership and the endpoint Leave could not withdraw (re-published here
    # to stand for a withdraw that never arrived).
    with entered(b.ns):
        b.services.overlays.publish("t4", "ef" * 32, "02:4e:0a:58:00:09", "10.88.0.9", "192.168.90.2", net_b)
    a.sync()
    b.sync()
    with entered(b.ns):
        assert b.services.overlays.endpoints("t4") == [], "the agent's pass withdrew it"
        assert b.services.etcd.get("overlays/t5") is None, "no membership of the network that failed"
        assert b.services.etcd.get("overlays/t4").value["members"] == {f"hosta:{net_a}": True, f"hostb:{net_b}": True}


def test_restart_rebuilds_the_vxlan_device_and_its_forwarding(cluster):
    lab, _, (a, b) = cluster
    net_a, net_b = "a6" * 32, "b6" * 32
    pool = a.network(net_a, "t6", SUBNET)
    b.network(net_b, "t6", SUBNET)
    ca, _, _ = a.container(net_a, pool, "e6" * 32)
    _, ip_b, _ = b.container(net_b, pool, "e7" * 32)
    a.sync()
    b.sync()
    lab.delete_link(a.ns, names.vxlan_name(net_a))  # as if the host had rebooted
    restarted = Host(lab, a.ns, "hosta", a.config["cluster"]["etcd_endpoints"], a.config["state_dir"])
    with entered(a.ns):
        reconcile(restarted.driver)
    assert a.fdb(net_a)["unicast"] == {names.mac_for(ip_b): "192.168.90.2"}
    assert _ping(lab, ca, ip_b), "the container on host A reaches host B's again"


def test_swarm_allocation_gives_every_node_the_same_overlay(cluster):
    _, _, (a, b) = cluster
    net = "d1" * 32
    assert a.driver.capabilities() == {"Scope": "global", "ConnectivityScope": "global"}, \
        "scope auto with etcd: global"
    ipv4 = [{"AddressSpace": "global", "Pool": SUBNET, "Gateway": "10.88.0.1/24"}]
    with entered(a.ns):  # the manager
        allocated = a.driver.allocate_network(net, {"mode": "overlay", "parent": "eth0"}, ipv4, [])["Options"]
    # the user's options and what was allocated: swarm gives every node this map, not the user's
    assert allocated == {"mode": "overlay", "parent": "eth0", "overlay": net, "vni": "4096"}
    for host in (a, b):  # every node gets the allocated options with CreateNetwork
        with entered(host.ns):
            host.driver.create_network(net, {"com.docker.network.generic": allocated}, ipv4, [])
            with IPRoute() as ipr:
                assert vxlan.vxlan_info(ipr, names.vxlan_name(net))["vni"] == 4096
    with entered(a.ns):
        a.driver.free_network(net)
        a.driver.free_network(net)  # unknown: done
        assert a.services.etcd.get("overlays/" + net) is not None, "still used by the nodes"
        a.driver.delete_network(net)
    with entered(b.ns):
        b.driver.delete_network(net)
        assert b.services.etcd.get("overlays/" + net) is None and b.services.etcd.get("vnis/4096") is None


def test_reclaim_frees_a_dead_hosts_share(cluster, tmp_path):
    lab, server, (a, b) = cluster
    net_a, net_b = "a7" * 32, "b7" * 32
    pool = a.network(net_a, "t7", SUBNET)
    b.network(net_b, "t7", SUBNET)
    _, ip_b, _ = b.container(net_b, pool, "e8" * 32)
    with entered(b.ns):
        OverlayAgent(b.services).keepalive()  # host B's liveness record, then host B "dies"
    config = tmp_path / "reclaim.toml"
    config.write_text(f'[cluster]\nstore = "etcd"\netcd_endpoints = "{server.url}"\netcd_prefix = "/ovtest/"\n'
                      f'host_id = "hosta"\n')
    argv = ["ip", "netns", "exec", a.ns, sys.executable, "-m", "netplugin", "reclaim", "--host", "hostb",
            "--config", str(config), "--state-dir", str(tmp_path / "cli-state")]
    refused = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=REPO)
    assert refused.returncode == 2 and "host hostb looks alive" in refused.stderr, refused.stderr
    done = subprocess.run([*argv, "--force"], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert "1 published endpoints" in done.stdout and "1 overlay memberships" in done.stdout, done.stdout
    with entered(a.ns):
        assert a.services.overlays.endpoints("t7") == []
        assert ip_b not in a.ipam.allocated(pool), "host B's container address is free again"
        assert a.services.etcd.get("overlays/t7").value["members"] == {f"hosta:{net_a}": True}


def test_egress_limit_on_an_overlay_is_enforced_on_its_vxlan_device(cluster):
    lab, _, (a, b) = cluster
    net_a, net_b = "a8" * 32, "b8" * 32
    pool = a.network(net_a, "t8", SUBNET, egress="30mbit")
    b.network(net_b, "t8", SUBNET)
    ca, _, _ = a.container(net_a, pool, "e9" * 32)
    cb, ip_b, _ = b.container(net_b, pool, "ea" * 32)
    a.sync()
    b.sync()
    got = tcp_mbit(cb, ca, ip_b, 5420)
    print(f"overlay container limited at 30mbit: {got:.1f} Mbit/s")
    assert abs(got - 30) <= 3, got
    with entered(a.ns), IPRoute() as ipr:
        assert list(tc.classes(ipr, names.vxlan_name(net_a)).values()) == [30_000_000]

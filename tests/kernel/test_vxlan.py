"""VXLAN devices and their FDB against the real kernel, in throwaway namespaces: the test thread sits
in the lab's "host" netns; the traffic test builds two more "hosts" joined by an underlay veth, each
with a bridge, a vxlan device and a "container" netns."""
import subprocess
import time

import pytest
from pyroute2 import IPRoute
from pyroute2.netlink.rtnl.ndmsg import NTF_MASTER

from netplugin.kernel import links, names, vxlan
from plugincore.errors import BackendError

pytestmark = pytest.mark.kernel
NET = "c3" * 32
VX = names.vxlan_name(NET)
LOCAL = "10.77.0.2"


class Recorder:
    """An IPRoute stand-in that forwards everything and records the link/fdb writes."""

    def __init__(self, ipr):
        self._ipr = ipr
        self.writes = []

    def link(self, command, **kwargs):
        if command != "get":
            self.writes.append(("link", command, kwargs))
        return self._ipr.link(command, **kwargs)

    def fdb(self, command, **kwargs):
        if command != "dump":
            self.writes.append(("fdb", command, kwargs))
        return self._ipr.fdb(command, **kwargs)


def _own_entries(ipr, name):
    """Every FDB entry of ``name`` as (mac, dst, flags), the kernel's own ones included."""
    index = links.get_link(ipr, name).index
    return {(m.get("NDA_LLADDR"), m.get("NDA_DST"), m["flags"]) for m in ipr.fdb("dump")
            if m["ifindex"] == index}


def test_names():
    assert VX == "npx-" + "c3" * 5 + "c" and len(VX) == 15
    assert names.is_owned(VX) and names.VXLAN_PREFIX in names.OWNED_PREFIXES


def test_ensure_vxlan_creates_once_and_refuses_mismatch(lab):
    with IPRoute() as ipr:
        eth1 = links.get_link(ipr, "eth1")
        bridge = links.ensure_bridge(ipr, "npb-vxtest", "02:00:00:00:00:aa", 1450)
        link = vxlan.ensure_vxlan(ipr, VX, vni=4242, local=LOCAL, dev="eth1", mtu=1450,
                                  master_index=bridge.index)
        assert (link.kind, link.mtu, link.up, link.master) == ("vxlan", 1450, True, bridge.index)
        info = vxlan.vxlan_info(ipr, VX)
        assert info == {"vni": 4242, "local": LOCAL, "port": 4789, "dev_index": eth1.index,
                        "learning": False}

        rec = Recorder(ipr)
        again = vxlan.ensure_vxlan(rec, VX, vni=4242, local=LOCAL, dev="eth1", mtu=1450,
                                   master_index=bridge.index)
        assert again == link and rec.writes == []

        ipr.link("set", index=link.index, mtu=1400, state="down")
        repaired = vxlan.ensure_vxlan(rec, VX, vni=4242, local=LOCAL, dev="eth1", mtu=1450,
                                      master_index=bridge.index)
        assert repaired == link and [w[1] for w in rec.writes] == ["set"]

        with pytest.raises(BackendError, match=r"npx-.*vni 4242 \(want 4243\)"):
            vxlan.ensure_vxlan(ipr, VX, vni=4243, local=LOCAL, dev="eth1", mtu=1300)
        with pytest.raises(BackendError, match=r"port 4789 \(want 8472\)"):
            vxlan.ensure_vxlan(ipr, VX, vni=4242, local=LOCAL, dev="eth1", mtu=1300, port=8472)
        with pytest.raises(BackendError, match=r"local 10.77.0.2 \(want 10.77.0.9\)"):
            vxlan.ensure_vxlan(ipr, VX, vni=4242, local="10.77.0.9", dev="eth1", mtu=1300)
        assert vxlan.vxlan_info(ipr, VX) == info and links.get_link(ipr, VX).mtu == 1450

        with pytest.raises(BackendError, match="npb-vxtest .*not a vxlan"):
            vxlan.ensure_vxlan(ipr, "npb-vxtest", vni=1, local=LOCAL, dev=None, mtu=1450)
        with pytest.raises(BackendError, match="npb-vxtest .*not a vxlan"):
            vxlan.remove_vxlan(ipr, "npb-vxtest")
        assert vxlan.vxlan_info(ipr, "npb-vxtest") is None
        with pytest.raises(BackendError, match="npx-nodev: underlay device nosuch"):
            vxlan.ensure_vxlan(ipr, "npx-nodev", vni=1, local=LOCAL, dev="nosuch", mtu=1450)

        assert vxlan.remove_vxlan(ipr, VX) is True
        assert vxlan.remove_vxlan(ipr, VX) is False
        assert links.get_link(ipr, VX) is None and vxlan.vxlan_info(ipr, VX) is None
        assert links.get_link(ipr, "npb-vxtest") is not None


def test_sync_fdb_makes_exactly_the_wanted_set(lab):
    with IPRoute() as ipr:
        bridge = links.ensure_bridge(ipr, "npb-vxtest", "02:00:00:00:00:aa", 1450)
        vxlan.ensure_vxlan(ipr, VX, vni=7, local=LOCAL, dev=None, mtu=1450, master_index=bridge.index)
        # an entry without destination (the bridge's, for this port), as an admin may add: not ours
        ipr.fdb("add", ifindex=links.get_link(ipr, VX).index, lladdr="02:00:00:00:00:99",
                flags=NTF_MASTER)
        foreign = {e for e in _own_entries(ipr, VX) if e[1] is None}
        assert any(e[0] == "02:00:00:00:00:99" for e in foreign)
        assert any(e[0] == links.get_link(ipr, VX).mac for e in foreign), "the bridge's own entry"
        assert vxlan.fdb_entries(ipr, VX) == {"unicast": {}, "flood": set()}

        first = {"02:00:00:00:00:01": "192.168.9.1", "02:00:00:00:00:02": "192.168.9.2",
                 "02:00:00:00:00:03": "192.168.9.2"}
        result = vxlan.sync_fdb(ipr, VX, unicast=first, flood={"192.168.9.1", "192.168.9.2"})
        assert result == {"added": 5, "removed": 0}
        assert vxlan.fdb_entries(ipr, VX) == {"unicast": first, "flood": {"192.168.9.1", "192.168.9.2"}}

        second = {"02:00:00:00:00:01": "192.168.9.3", "02:00:00:00:00:02": "192.168.9.2"}
        result = vxlan.sync_fdb(ipr, VX, unicast={k.upper(): v for k, v in second.items()},
                                flood={"192.168.9.2"})
        assert result == {"added": 1, "removed": 3}  # 01 moved (1+1), 03 and one flood dropped
        assert vxlan.fdb_entries(ipr, VX) == {"unicast": second, "flood": {"192.168.9.2"}}
        assert {e for e in _own_entries(ipr, VX) if e[1] is None} == foreign

        rec = Recorder(ipr)
        assert vxlan.sync_fdb(rec, VX, unicast=second, flood={"192.168.9.2"}) == {"added": 0, "removed": 0}
        assert rec.writes == []

        assert vxlan.sync_fdb(ipr, VX, unicast={}, flood=set()) == {"added": 0, "removed": 3}
        assert vxlan.fdb_entries(ipr, VX) == {"unicast": {}, "flood": set()}
        assert {e for e in _own_entries(ipr, VX) if e[1] is None} == foreign

        with pytest.raises(BackendError, match="npx-.*00:00:00:00:00:00 is the flood entry"):
            vxlan.sync_fdb(ipr, VX, unicast={"00:00:00:00:00:00": "192.168.9.1"}, flood=set())
        with pytest.raises(BackendError, match="npx-nosuch does not exist"):
            vxlan.sync_fdb(ipr, "npx-nosuch", unicast={}, flood=set())


def test_incremental_entries_are_idempotent(lab):
    with IPRoute() as ipr:
        vxlan.ensure_vxlan(ipr, VX, vni=7, local=LOCAL, dev=None, mtu=1450)
        mac = "02:00:00:00:00:01"
        for _ in range(2):
            vxlan.add_remote(ipr, VX, mac.upper(), "192.168.9.1")
            vxlan.add_flood(ipr, VX, "192.168.9.1")
            vxlan.add_flood(ipr, VX, "192.168.9.2")
        assert vxlan.fdb_entries(ipr, VX) == {"unicast": {mac: "192.168.9.1"},
                                              "flood": {"192.168.9.1", "192.168.9.2"}}
        vxlan.add_remote(ipr, VX, mac, "192.168.9.5")  # the endpoint moved
        vxlan.remove_remote(ipr, VX, mac, "192.168.9.1")  # a late removal for its old place
        assert vxlan.fdb_entries(ipr, VX)["unicast"] == {mac: "192.168.9.5"}
        for _ in range(2):
            vxlan.remove_remote(ipr, VX, mac)
            vxlan.remove_flood(ipr, VX, "192.168.9.1")
        assert vxlan.fdb_entries(ipr, VX) == {"unicast": {}, "flood": {"192.168.9.2"}}
        vxlan.remove_flood(ipr, VX, "192.168.9.2")
        vxlan.remove_flood(ipr, VX, "192.168.9.2")  # no all-zero entry left at all
        assert vxlan.fdb_entries(ipr, VX) == {"unicast": {}, "flood": set()}


def _ping(ns: str, address: str) -> bool:
    return subprocess.run(["ip", "netns", "exec", ns, "ping", "-c", "1", "-W", "1", address],
                          capture_output=True, timeout=10).returncode == 0


def _ping_within(ns: str, address: str, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while True:
        if _ping(ns, address):
            return True
        if time.monotonic() > deadline:
            return False


def _host(host_ns: str, container_ns: str, underlay: str, container_ip: str, container_mac: str) -> None:
    """In ``host_ns``: underlay address, bridge + vxlan (VNI 100), and ``container_ns`` on a veth."""
    with IPRoute(netns=host_ns) as ipr:
        eth = ipr.link_lookup(ifname="u0")[0]
        ipr.addr("add", index=eth, address=underlay, prefixlen=24)
        ipr.link("set", index=eth, state="up")
        host_byte = int(underlay.split(".")[-1])
        bridge = links.ensure_bridge(ipr, "npb-ovl", f"02:00:00:00:01:{host_byte:02x}", 1450)
        vxlan.ensure_vxlan(ipr, VX, vni=100, local=underlay, dev="u0", mtu=1450, master_index=bridge.index)
        links.ensure_veth(ipr, "npe-ovl", "npc-ovl", mtu=1450, peer_mac=container_mac,
                          master_index=bridge.index)
        ipr.link("set", index=ipr.link_lookup(ifname="npc-ovl")[0], net_ns_fd=container_ns)
    with IPRoute(netns=container_ns) as ipr:
        idx = ipr.link_lookup(ifname="npc-ovl")[0]
        ipr.link("set", index=idx, ifname="eth0", state="up")
        ipr.addr("add", index=idx, address=container_ip, prefixlen=24)


def _sync(host_ns: str, **wanted) -> dict:
    with IPRoute(netns=host_ns) as ipr:
        return vxlan.sync_fdb(ipr, VX, **wanted)


def test_traffic_flows_only_through_fdb_entries(lab):
    host_a, host_b = lab.add_ns("a"), lab.add_ns("b")
    cont_a, cont_b = lab.add_ns("c"), lab.add_ns("d")
    with IPRoute(netns=host_a) as ipr:
        ipr.link("add", ifname="u0", kind="veth", peer={"ifname": "u0", "net_ns_fd": host_b})
    mac_a, mac_b = "02:4e:0a:42:00:01", "02:4e:0a:42:00:02"
    _host(host_a, cont_a, "192.168.77.1", "10.66.0.1", mac_a)
    _host(host_b, cont_b, "192.168.77.2", "10.66.0.2", mac_b)

    assert not _ping(cont_a, "10.66.0.2"), "no FDB entries: no way across"

    both = {"added": 2, "removed": 0}
    assert _sync(host_a, unicast={mac_b: "192.168.77.2"}, flood={"192.168.77.2"}) == both
    assert _sync(host_b, unicast={mac_a: "192.168.77.1"}, flood={"192.168.77.1"}) == both
    assert _ping_within(cont_a, "10.66.0.2", 3)
    assert _ping_within(cont_b, "10.66.0.1", 3)

    assert _sync(host_a, unicast={}, flood=set()) == {"added": 0, "removed": 2}
    assert _sync(host_b, unicast={}, flood=set()) == {"added": 0, "removed": 2}
    assert not _ping(cont_a, "10.66.0.2")
    assert not _ping(cont_b, "10.66.0.1")


def test_thousand_entries_sync_then_noop(lab):
    with IPRoute() as ipr:
        vxlan.ensure_vxlan(ipr, VX, vni=9, local=LOCAL, dev=None, mtu=1450)
        vteps = [f"192.168.{10 + i // 250}.{i % 250 + 1}" for i in range(40)]
        unicast = {f"02:00:00:00:{i >> 8:02x}:{i & 0xff:02x}": vteps[i % len(vteps)] for i in range(1000)}
        started = time.monotonic()
        assert vxlan.sync_fdb(ipr, VX, unicast=unicast, flood=set(vteps)) == {"added": 1040, "removed": 0}
        first = time.monotonic() - started
        started = time.monotonic()
        assert vxlan.sync_fdb(ipr, VX, unicast=unicast, flood=set(vteps)) == {"added": 0, "removed": 0}
        second = time.monotonic() - started
        print(f"sync_fdb 1040 entries: first {first:.3f}s, identical resync {second:.3f}s")
        assert vxlan.fdb_entries(ipr, VX) == {"unicast": unicast, "flood": set(vteps)}

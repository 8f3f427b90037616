"""SR-IOV mode. The kernel tests need a real SR-IOV NIC: the VM lane's emulated Intel igb (the PF, 7
VFs) whose wire (a QEMU hub) also holds a virtio-net NIC, the "peer" (scripts/vm-lane run --igb).
They run in the VM's initial namespace (sysfs shows the netdevs of the namespace it was mounted in)
and play Docker's part: move the VF netdev into a sandbox namespace, rename it, set its MAC and
address. Inventory, parsing and validation tests run on the host too."""
import multiprocessing
import re
import subprocess
import time

import pytest
from pyroute2 import IPRoute, netns as pr_netns

from netplugin import config as netconfig
from netplugin.kernel import sriov
from netplugin.modes.sriov import parse_mac, parse_rate
from netplugin.reconcile import reconcile
from netplugin.service import Services
from netplugin.sriov_inventory import SRIOV_SCHEMA, Inventory
from plugincore.errors import Conflict, InvalidRequest
from plugincore.store import Store
from tests.kernel.conftest import lab  # noqa: F401 - the kernel tests' namespace fixture
from tests.vm.conftest import WIRE_PEER_IP

SUBNET = [{"AddressSpace": "local", "Pool": "10.79.0.0/24", "Gateway": "10.79.0.1/24"}]
PEER_IP = WIRE_PEER_IP  # the wire fixture's peer (tests/vm/conftest.py)
NET = "5a" * 32


def _ep(n: int) -> str:
    return f"e{n}" * 32


# ---- host and VM: parsing, inventory, fake sysfs ----

def test_rate_and_mac_parsing():
    assert parse_rate("") == 0 and parse_rate("100") == 100 and parse_rate("250mbit") == 250
    assert parse_rate("40 Mbit") == 40
    for bad in ("fast", "1.5", "-3", "10kbit"):
        with pytest.raises(InvalidRequest, match="not a rate"):
            parse_rate(bad)
    with pytest.raises(InvalidRequest, match="exceeds the link speed of 1000"):
        parse_rate("2000", 1000)
    assert parse_mac("02:AA:bb:cc:dd:01") == "02:aa:bb:cc:dd:01"
    for bad in ("01:00:5e:00:00:01", "00:00:00:00:00:00", "02:aa:bb", "zz:aa:bb:cc:dd:ee"):
        with pytest.raises(InvalidRequest, match="not a unicast MAC"):
            parse_mac(bad)


def _claim_many(path, worker, results):
    inv = Inventory(Store(path, SRIOV_SCHEMA))
    got = []
    for n in range(6):
        try:
            got.append(inv.claim("net1" * 16, f"w{worker}ep{n}").vf)
        except Conflict as exc:
            got.append(str(exc))
    results.put(got)


def test_inventory_claims_are_exclusive_across_processes(tmp_path):
    path = str(tmp_path / "netplugin.db")
    inv = Inventory(Store(path, SRIOV_SCHEMA))
    inv.register("net1" * 16, "pf0", {n: (f"0000:01:10.{n}", f"eth{n + 2}") for n in range(4)})
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    workers = [ctx.Process(target=_claim_many, args=(path, w, results)) for w in range(2)]
    for p in workers:
        p.start()
    got = [results.get(timeout=60) for _ in workers]
    for p in workers:
        p.join(30)
    vfs = [v for g in got for v in g if isinstance(v, int)]
    assert sorted(vfs) == [0, 1, 2, 3], "each VF handed out exactly once"
    refusals = [v for g in got for v in g if isinstance(v, str)]
    assert len(refusals) == 8 and all("no free VF on PF pf0: 4 of 4 VFs" in r for r in refusals)
    # a claim is idempotent per endpoint; release returns the VF; register keeps claims
    holder = next(vf.endpoint_id for vf in inv.pool() if vf.endpoint_id)
    held = inv.claimed_by(holder)
    assert inv.claim("net1" * 16, holder) == held
    inv.register("net1" * 16, "pf0", {n: (f"0000:01:10.{n}", "") for n in range(4)})
    assert inv.claimed_by(holder) == held and held.netdev.startswith("eth")
    inv.release(holder)
    assert inv.claim("net1" * 16, "new").vf == held.vf
    # a VF whose netdev is not at home is skipped and named in the refusal
    inv.release("new")
    with pytest.raises(Conflict, match="3 of 4 VFs .* in use; 1 more not in this host's namespace"):
        inv.claim("net1" * 16, "x", usable=lambda vf: False)


def test_sysfs_discovery(tmp_path, monkeypatch):
    dev = tmp_path / "pci" / "0000:01:00.0"
    (tmp_path / "net" / "eth1").mkdir(parents=True)
    dev.mkdir(parents=True)
    (tmp_path / "net" / "eth1" / "device").symlink_to(dev)
    (dev / "sriov_totalvfs").write_text("7\n")
    (dev / "sriov_numvfs").write_text("3\n")
    for n, where in enumerate(("home", "away", "nodriver")):
        vf = tmp_path / "pci" / f"0000:01:10.{n}"
        (vf / "net").mkdir(parents=True)
        (dev / f"virtfn{n}").symlink_to(vf)
        if where != "nodriver":
            (vf / "driver").mkdir()
        if where == "home":
            (vf / "net" / "eth5").mkdir()
    monkeypatch.setattr(sriov, "SYSFS_NET", str(tmp_path / "net"))
    assert sriov.total_vfs("eth1") == 7 and sriov.num_vfs("eth1") == 3
    assert sriov.total_vfs("eth9") is None
    assert sriov.vf_pci("eth1", 1) == "0000:01:10.1" and sriov.vf_netdev("eth1", 0) == "eth5"
    assert [sriov.vf_location("eth1", n) for n in range(4)] == [sriov.HOME, sriov.AWAY, sriov.ABSENT,
                                                                sriov.ABSENT]


def test_parent_must_be_seen_in_sysfs(lab, tmp_path):  # noqa: F811
    # A throwaway namespace's eth1 is not what /sys/class/net (mounted in the host's) describes.
    driver = Services(netconfig.load(overrides={"state_dir": str(tmp_path / "s")}, environ={})).driver
    with pytest.raises(InvalidRequest, match="must run in the host's network namespace"):
        driver.create_network(NET, {"com.docker.network.generic": {"mode": "sriov", "parent": "eth1"}},
                              SUBNET, [])
    with pytest.raises(InvalidRequest, match="needs -o parent"):
        driver.create_network(NET, {"com.docker.network.generic": {"mode": "sriov"}}, SUBNET, [])


# ---- VM: the emulated igb NIC ----

def _driver(tmp_path):
    return Services(netconfig.load(overrides={"state_dir": str(tmp_path / "state")}, environ={})).driver


def _opts(pf, **more):
    return {"com.docker.network.generic": {"mode": "sriov", "parent": pf, **more}}


def _vf_lines(pf) -> dict[int, str]:
    out = subprocess.run(["ip", "link", "show", pf], capture_output=True, text=True, check=True).stdout
    return {int(m.group(1)): m.group(2) for m in re.finditer(r"^\s+vf (\d+)\s+(.*)$", out, re.M)}


def _plug(driver, ns, ep, address, options=None):
    """CreateEndpoint + Join, then what Docker does: move, rename, set MAC, address."""
    reply = driver.create_endpoint(NET, ep, {"Address": f"{address}/24"}, options or {})
    mac = reply["Interface"].get("MacAddress")
    join = driver.join(NET, ep, "/var/run/docker/netns/test")
    src = join["InterfaceName"]["SrcName"]
    assert join["InterfaceName"]["DstPrefix"] == "eth" and join["Gateway"] == PEER_IP
    sandbox = ns()
    with IPRoute() as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname=src)[0], net_ns_fd=sandbox)
    with IPRoute(netns=sandbox) as ipr:
        idx = ipr.link_lookup(ifname=src)[0]
        ipr.link("set", index=idx, ifname="eth0")
        ipr.link("set", index=idx, address=mac)  # Docker sets the endpoint's MAC: must be accepted
        ipr.link("set", index=idx, state="up")
        ipr.addr("add", index=idx, address=address, prefixlen=24)
    return src, mac, sandbox


def _ping(ns, address, tries=15) -> bool:
    for _ in range(tries):  # the VF link comes up a moment after it is set up
        if subprocess.run(["ip", "netns", "exec", ns, "ping", "-c", "1", "-W", "1", address],
                          capture_output=True, timeout=30).returncode == 0:
            return True
        time.sleep(0.5)
    return False


def _in_use(driver):
    """VF -> endpoint holding it, from the driver's persisted inventory."""
    inventory = driver.modes.get("sriov").inventory
    return {vf.vf: vf.endpoint_id for vf in inventory.pool(NET) if vf.endpoint_id}


@pytest.mark.vm
def test_parent_must_be_a_physical_function(wire_peer, tmp_path):
    driver = _driver(tmp_path)
    with pytest.raises(InvalidRequest, match=f"parent {wire_peer} is not an SR-IOV physical function"):
        driver.create_network(NET, _opts(wire_peer), SUBNET, [])


@pytest.mark.vm
def test_endpoints_get_configured_vfs_and_reach_the_peer(wire, tmp_path):
    pf, peer_ns, ns = wire
    driver = _driver(tmp_path)
    t0 = time.monotonic()
    driver.create_network(NET, _opts(pf, vfs="3"), SUBNET, [])
    print(f"create_network (enable 3 VFs): {time.monotonic() - t0:.1f}s")
    assert sriov.num_vfs(pf) == 3
    names = {n: sriov.vf_netdev(pf, n) for n in range(3)}
    src1, mac1, sb1 = _plug(driver, ns, _ep(1), "10.79.0.10", {"rate": "100mbit"})
    src2, mac2, sb2 = _plug(driver, ns, _ep(2), "10.79.0.11", {"mac": "02:aa:bb:cc:dd:02", "rate": "200"})
    assert mac1 == "02:4e:0a:4f:00:0a" and mac2 == "02:aa:bb:cc:dd:02"
    assert _in_use(driver) == {0: _ep(1), 1: _ep(2)} and (src1, src2) == (names[0], names[1])
    lines = _vf_lines(pf)
    assert mac1 in lines[0] and "max_tx_rate 100Mbps" in lines[0] and "spoof checking on" in lines[0]
    assert mac2 in lines[1] and "max_tx_rate 200Mbps" in lines[1] and "trust off" in lines[1]
    assert "vlan" not in lines[0]
    assert _ping(sb1, PEER_IP) and _ping(sb2, PEER_IP), "containers reach the peer across the wire"
    neigh = subprocess.run(["ip", "netns", "exec", peer_ns, "ip", "neigh"], capture_output=True,
                           text=True).stdout
    assert mac1 in neigh and mac2 in neigh, "the peer sees the VFs' own MACs"
    assert driver.oper_info(NET, _ep(1))["vf"] == 0
    # a live change through the admin interface sets the VF's hardware rate; clearing it restores the option's
    assert driver.shape(_ep(1), "150mbit", None)["egress"] == "150mbit (admin)"
    assert "max_tx_rate 150Mbps" in _vf_lines(pf)[0]
    with pytest.raises(InvalidRequest, match="ingress limits are not supported in sriov mode"):
        driver.shape(_ep(1), None, "10mbit")
    driver.shape(_ep(1), None, None, clear=True)
    assert "max_tx_rate 100Mbps" in _vf_lines(pf)[0] and driver.oper_info(NET, _ep(1))["egress"] == "100mbit (option)"

    # Leave resets the VF at once (it is still in the sandbox); the sandbox dies and the kernel
    # returns the VF to the initial namespace as "eth0" (or devN), not under its old name.
    driver.leave(NET, _ep(1))
    assert "00:00:00:00:00:00" in _vf_lines(pf)[0] and "max_tx_rate" not in _vf_lines(pf)[0]
    pr_netns.remove(sb1)
    for _ in range(100):
        if sriov.vf_location(pf, 0) == sriov.HOME:
            break
        time.sleep(0.1)
    print("VF 0 came home as", sriov.vf_netdev(pf, 0))
    driver.delete_endpoint(NET, _ep(1))
    assert _in_use(driver) == {1: _ep(2)}
    src3, _, sb3 = _plug(driver, ns, _ep(3), "10.79.0.12")
    assert src3 == names[0], "the freed VF is handed out again, under its original name"
    assert _ping(sb3, PEER_IP)
    for ep in (_ep(2), _ep(3)):
        driver.leave(NET, ep)
        driver.delete_endpoint(NET, ep)
    for sb in (sb2, sb3):
        pr_netns.remove(sb)
    time.sleep(0.5)
    driver.delete_network(NET)
    assert sriov.num_vfs(pf) == 0, "VFs the network enabled are disabled with it"
    assert driver.modes.get("sriov").inventory.pool() == []


@pytest.mark.vm
def test_vlan_exhaustion_and_bad_options(wire, tmp_path):
    pf, peer_ns, ns = wire
    driver = _driver(tmp_path)
    with pytest.raises(InvalidRequest, match="not a VF count"):
        driver.create_network(NET, _opts(pf, vfs="99"), SUBNET, [])
    with pytest.raises(InvalidRequest, match="not a VLAN id"):
        driver.create_network(NET, _opts(pf, vlan="5000"), SUBNET, [])
    assert sriov.num_vfs(pf) == 0
    driver.create_network(NET, _opts(pf, vfs="2", vlan="10"), SUBNET, [])
    with pytest.raises(InvalidRequest, match="not a rate"):
        driver.create_endpoint(NET, _ep(9), {"Address": "10.79.0.19/24"}, {"rate": "fast"})
    with pytest.raises(InvalidRequest, match="unknown endpoint option"):
        driver.create_endpoint(NET, _ep(9), {"Address": "10.79.0.19/24"}, {"ingress": "1mbit"})  # no ingress limits for VFs
    # the peer's side of VLAN 10
    with IPRoute(netns=peer_ns) as ipr:
        base = [l for l in ipr.get_links() if l.get("ifname") != "lo"][0]
        ipr.flush_addr(index=base["index"])
        ipr.link("add", ifname="peer.10", kind="vlan", link=base["index"], vlan_id=10)
        idx = ipr.link_lookup(ifname="peer.10")[0]
        ipr.link("set", index=idx, state="up")
        ipr.addr("add", index=idx, address=PEER_IP, prefixlen=24)
    _, _, sb1 = _plug(driver, ns, _ep(1), "10.79.0.10")
    _plug(driver, ns, _ep(2), "10.79.0.11")
    lines = _vf_lines(pf)
    assert "vlan 10" in lines[0] and "vlan 10" in lines[1]
    assert _ping(sb1, PEER_IP), "the PF tags the VF's frames with VLAN 10"
    driver.create_endpoint(NET, _ep(3), {"Address": "10.79.0.12/24"}, {})
    with pytest.raises(Conflict, match=f"no free VF on PF {pf}: 2 of 2 VFs"):
        driver.join(NET, _ep(3), "/x")
    driver.delete_endpoint(NET, _ep(3))
    driver.leave(NET, _ep(2))
    driver.delete_endpoint(NET, _ep(2))
    assert "vlan" not in _vf_lines(pf)[1], "the released VF's VLAN is reset to 0"


@pytest.mark.vm
def test_restart_frees_vfs_of_vanished_endpoints(wire, tmp_path):
    pf, _, ns = wire
    driver = _driver(tmp_path)
    driver.create_network(NET, _opts(pf, vfs="3"), SUBNET, [])
    _, _, sb1 = _plug(driver, ns, _ep(1), "10.79.0.10", {"rate": "50"})
    _, _, sb2 = _plug(driver, ns, _ep(2), "10.79.0.11")
    # ep3 is joined but its VF never left the host namespace; then the plugin "crashes" and its
    # state loses ep2 and ep3 (e.g. a restored backup): ep2's VF is in a container, ep3's is home.
    driver.create_endpoint(NET, _ep(3), {"Address": "10.79.0.12/24"}, {"rate": "30"})
    driver.join(NET, _ep(3), "/x")
    assert _in_use(driver) == {0: _ep(1), 1: _ep(2), 2: _ep(3)}
    driver.state.drop_endpoint(_ep(2))
    driver.state.drop_endpoint(_ep(3))
    restarted = _driver(tmp_path)
    t0 = time.monotonic()
    summary = reconcile(restarted)
    print(f"reconcile: {time.monotonic() - t0:.1f}s {summary}")
    assert summary["freed_vfs"] == 1 and summary["kept_vfs"] == 1
    assert summary["repaired_endpoints"] == 1 and summary["lost_endpoints"] == 0
    assert _in_use(driver) == {0: _ep(1), 1: _ep(2)}
    lines = _vf_lines(pf)
    assert "00:00:00:00:00:00" in lines[2] and "max_tx_rate" not in lines[2], "ep3's VF reset"
    assert "max_tx_rate 50Mbps" in lines[0]
    assert _ping(sb1, PEER_IP), "the surviving container keeps its VF"
    _, _, sb4 = _plug(restarted, ns, _ep(4), "10.79.0.13")
    assert _in_use(driver)[2] == _ep(4) and _ping(sb4, PEER_IP)
    # once ep2's container is gone and its VF home, the next reconciliation frees it
    pr_netns.remove(sb2)
    for _ in range(100):
        if sriov.vf_location(pf, 1) == sriov.HOME:
            break
        time.sleep(0.1)
    assert reconcile(_driver(tmp_path))["freed_vfs"] == 1
    assert 1 not in _in_use(driver)

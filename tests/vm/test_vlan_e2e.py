"""VLAN mode end to end through a real dockerd inside the VM lane (8021q exists only there).

Topology (tests/lab network namespaces, one dockerd + one plugin for the module):

    hosta (Docker host)                               peer (a host on the far end of the trunk)
      npb-<v100> --- eth1.100 --+                     +-- eth1.100  10.78.0.50/24
      npb-<v200> --- eth1.200 --+-- eth1 ===== eth1 --+-- eth1.200  10.78.0.60/24
                                      (802.1Q trunk)

Both tenant networks use the SAME subnet 10.78.0.0/24 (one shared, reference-counted IPAM pool), so
only the VLAN tags keep them apart. The peer is a strict host (arp_ignore=1, arp_announce=2, one
routing table per source address): each of its addresses answers on its own VLAN only, like two
tenant machines behind one trunk. Without that, Linux's weak host model would answer ARP for
10.78.0.60 on eth1.100 and the isolation checks would test the peer, not the plugin.

The dockerd's data root is under /tmp, which the guest mounts as a tmpfs (overlay2 cannot sit on the
guest's overlayfs root). Run it with:

    bash scripts/test-vm tests/vm/test_vlan_e2e.py
"""
from __future__ import annotations

import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.lab import BUSYBOX, REPO_ROOT, sh
from tests.lab import skip_reason as lab_skip_reason
from tests.lab.image import IMAGE
from tests.lab.netns import Lab
from tests.lab.stack import DOCKER_TIMEOUT, docker_stack

pytestmark = pytest.mark.vm

SUBNET, GW = "10.78.0.0/24", "10.78.0.1"
PEER = {100: "10.78.0.50", 200: "10.78.0.60"}
CONTAINER = {100: "10.78.0.10", 200: "10.78.0.20"}


def _phase(what: str, since: float) -> float:
    now = time.monotonic()
    print(f"vlan-e2e: {what}: {now - since:.1f} s", file=sys.stderr)
    return now


@pytest.fixture(scope="module")
def trunk(vm):
    """hosta and peer joined by a veth trunk (eth1 <-> eth1); the peer's VLAN sub-interfaces."""
    reason = lab_skip_reason()
    if reason:
        pytest.skip(f"e2e lab unavailable: {reason}")
    if vm.run("modprobe", "8021q", check=False).returncode != 0:
        pytest.skip("no 8021q module in this kernel: runs in the VM lane (scripts/test-vm)")
    lab = Lab()
    try:
        hosta, peer = lab.netns("hosta"), lab.netns("peer")
        lab.veth(hosta, "eth1", peer, "eth1")
        lines = []
        for vlan, address in PEER.items():
            sub = f"eth1.{vlan}"
            lines += [f"link add link eth1 name {sub} type vlan id {vlan}",
                      f"addr add {address}/24 dev {sub}", f"link set {sub} up",
                      f"route add {SUBNET} dev {sub} src {address} table {vlan}",
                      f"rule add from {address} table {vlan} pref {vlan}"]
        sh(["ip", "netns", "exec", peer, "sysctl", "-qw", "net.ipv4.conf.all.arp_ignore=1",
            "net.ipv4.conf.all.arp_announce=2"])
        sh(["ip", "-n", peer, "-batch", "-"], input="\n".join(lines) + "\n")
        yield lab, hosta, peer
    finally:
        lab.destroy()


@pytest.fixture(scope="module")
def stack(trunk, tmp_path_factory):
    """(dockerd, plugin) in hosta, one after the other: ~50 s together in the VM (side by side
    saved nothing measurable on the 2 emulated CPUs)."""
    _, hosta, _ = trunk
    if not (REPO_ROOT / "netplugin" / "__main__.py").exists():
        pytest.skip("netplugin/__main__.py does not exist")
    with docker_stack(hosta, tmp_path_factory, "vlan-e2e") as stack_:
        yield stack_


def _parallel(fn, *args_list):
    """fn(*args) for each args tuple at once; results in order. For calls that mostly wait (ping
    timeouts); CPU-bound work does not get faster on the VM's 2 emulated CPUs."""
    with ThreadPoolExecutor(len(args_list)) as pool:
        return [f.result() for f in [pool.submit(fn, *args) for args in args_list]]


def _docker(dockerd, *args, check=True):
    return dockerd.docker(*args, check=check, timeout=DOCKER_TIMEOUT)


def _create_vlan_net(dockerd, plugin, name, vlan, check=True):
    return _docker(dockerd, "network", "create", "-d", plugin.name, "--ipam-driver", plugin.name,
                   "-o", "mode=vlan", "-o", "parent=eth1", "-o", f"vlan={vlan}",
                   "--subnet", SUBNET, "--gateway", GW, name, check=check)


def _reachability(dockerd, container, targets) -> dict[str, bool]:
    """Ping every target from inside ``container``, all at once in one ``docker exec`` (each exec
    costs seconds in the VM): one echo request each, 3 s for the reply."""
    script = " ".join(f"(if ping -c 1 -W 3 {t} >/dev/null 2>&1; then echo {t} yes; else echo {t} no; fi) &"
                      for t in targets) + " wait"
    out = _docker(dockerd, "exec", container, "sh", "-c", script).stdout.split()
    return {out[i]: out[i + 1] == "yes" for i in range(0, len(out), 2)}


def _plugin_links(lab, ns) -> list[str]:
    return sorted(n for n in lab.links(ns) if n.startswith("np") or n.startswith("eth1."))


def test_vlan_tenants_through_dockerd(trunk, stack):
    lab, hosta, peer = trunk
    dockerd, plugin = stack
    t = time.monotonic()
    net_ids = {vlan: _create_vlan_net(dockerd, plugin, f"v{vlan}", vlan).stdout.strip()
               for vlan in (100, 200)}  # same --subnet twice: one shared, refcounted pool
    t = _phase("2 networks created", t)

    links = lab.links(hosta)
    for vlan, net_id in net_ids.items():
        bridge, sub = f"npb-{net_id[:11]}", f"eth1.{vlan}"
        assert links[sub]["kind"] == "vlan", f"{sub} not created: {sorted(links)}"
        assert links[sub]["master"] == links[bridge]["index"], f"{sub} is not a port of {bridge}"
    assert plugin.state_rows("SELECT pool, refs FROM ipam_pools") == [(SUBNET, 2)], \
        "both networks share one reference-counted pool"
    addresses = [a for a in lab.addresses(hosta) if not a.startswith("127.")]
    assert addresses == [], "the Docker host's bridges and VLAN links carry no address"

    dup = _create_vlan_net(dockerd, plugin, "v100bis", 100, check=False)
    assert dup.returncode != 0 and "eth1.100 is already used" in dup.stderr, dup.stderr
    assert plugin.state_rows("SELECT refs FROM ipam_pools") == [(2,)], \
        "the refused network gave its pool reference back"

    for vlan, address in CONTAINER.items():  # one at a time: in parallel they were no faster
        _docker(dockerd, "run", "-d", "--network", f"v{vlan}", "--ip", address, "--name", f"c{vlan}",
                IMAGE, "sleep", "3600")
    t = _phase("2 containers running", t)

    seen = dict(zip((100, 200), _parallel(
        lambda vlan: _reachability(dockerd, f"c{vlan}", [PEER[100], PEER[200], CONTAINER[300 - vlan]]),
        (100,), (200,))))
    t = _phase("reachability checked", t)
    assert seen[100] == {PEER[100]: True, PEER[200]: False, CONTAINER[200]: False}, \
        f"container on VLAN 100 reached (yes/no): {seen[100]}"
    assert seen[200] == {PEER[100]: False, PEER[200]: True, CONTAINER[100]: False}, \
        f"container on VLAN 200 reached (yes/no): {seen[200]}"
    # ...and the peer reaches each container from its own VLAN's address (tagged traffic inbound).
    for vlan in (100, 200):
        ping = [BUSYBOX, "ping", "-c", "2", "-W", "2", "-I", PEER[vlan], CONTAINER[vlan]]
        assert lab.sh(peer, ping, check=False, timeout=30).returncode == 0, \
            f"peer {PEER[vlan]} cannot reach container {CONTAINER[vlan]} on VLAN {vlan}"

    _docker(dockerd, "rm", "-f", "c100", "c200")
    _docker(dockerd, "network", "rm", "v100", "v200")
    _phase("containers and networks removed", t)
    assert _plugin_links(lab, hosta) == [], "eth1.100, eth1.200, bridges and veths are removed"
    left = lab.links(hosta)
    assert "eth1" in left and left["eth1"]["up"] and left["eth1"]["master"] is None, left.get("eth1")
    # Docker and the plugin forgot both networks; the shared pool's last release dropped it.
    assert [n["name"] for n in dockerd.networks()] == []
    for table in ("networks", "endpoints", "ipam_pools", "ipam_addresses"):
        assert plugin.state_rows(f"SELECT COUNT(*) FROM {table}") == [(0,)], f"{table} not empty"

"""SR-IOV mode end to end through a real dockerd inside the VM lane (the emulated igb NIC exists
only there).

Topology: the plugin and dockerd run in the guest's initial network namespace, where the igb PF
lives and where the kernel creates its VFs (sysfs, mounted there, is how the plugin finds them);
the guest is throwaway and its only NICs sit on a private emulated wire. The wire peer (the
virtio-net NIC on the same QEMU hub) is moved into its own namespace with 10.79.0.1/24, which is
also the network's gateway:

    guest (Docker host)                                  peer netns
      igb PF (enp...) -- VF0 -> container c1 --+
                      -- VF1 -> container c2 --+-- QEMU hub -- virtio NIC 10.79.0.1/24

Run it with:

    bash scripts/test-vm tests/vm/test_sriov_e2e.py
"""
from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest

from netplugin.kernel import sriov
from tests.lab import REPO_ROOT
from tests.lab import skip_reason as lab_skip_reason
from tests.lab.image import IMAGE
from tests.lab.stack import DOCKER_TIMEOUT, docker_stack
from tests.vm.conftest import WIRE_PEER_IP

pytestmark = pytest.mark.vm

SUBNET = "10.79.0.0/24"
C1, C2, C3 = "10.79.0.10", "10.79.0.11", "10.79.0.12"
C2_MAC = "02:aa:bb:cc:dd:02"


def _phase(what: str, since: float) -> float:
    now = time.monotonic()
    print(f"sriov-e2e: {what}: {now - since:.1f} s", file=sys.stderr)
    return now


@pytest.fixture(scope="module")
def stack(vm, tmp_path_factory):
    """(dockerd, plugin) in the guest's initial namespace."""
    reason = lab_skip_reason()
    if reason:
        pytest.skip(f"e2e lab unavailable: {reason}")
    if not (REPO_ROOT / "netplugin" / "__main__.py").exists():
        pytest.skip("netplugin/__main__.py does not exist")
    with docker_stack(None, tmp_path_factory, "sriov-e2e") as stack_:
        yield stack_


def _docker(dockerd, *args, check=True):
    return dockerd.docker(*args, check=check, timeout=DOCKER_TIMEOUT)


def _vf_lines(pf) -> dict[int, str]:
    """What the PF says about each VF (``ip link show``: MAC, VLAN, rate, spoof checking, trust)."""
    out = subprocess.run(["ip", "link", "show", pf], capture_output=True, text=True, check=True).stdout
    return {int(m.group(1)): m.group(2) for m in re.finditer(r"^\s+vf (\d+)\s+(.*)$", out, re.M)}


def _inside(dockerd, container) -> dict[str, str]:
    """eth0's MAC and driver, and whether the peer answers, seen from inside ``container``
    (one ``docker exec``: each costs seconds in the VM). The VF link needs a moment after Docker
    sets it up, so the ping is retried for a few seconds."""
    script = ("cat /sys/class/net/eth0/address; basename $(readlink /sys/class/net/eth0/device/driver); "
              f"for i in 1 2 3 4 5 6 7 8; do ping -c 1 -W 1 {WIRE_PEER_IP} >/dev/null 2>&1 "
              "&& { echo reached; exit 0; }; sleep 0.5; done; echo unreachable")
    mac, driver, ping = _docker(dockerd, "exec", container, "sh", "-c", script).stdout.split()
    return {"mac": mac, "driver": driver, "ping": ping}


def _wait_home(pf, vf, timeout=30.0) -> bool:
    deadline = time.monotonic() + timeout
    while sriov.vf_location(pf, vf) != sriov.HOME:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def test_containers_get_vfs_through_dockerd(stack, wire):
    dockerd, plugin = stack
    pf, peer_ns, _ = wire
    t = time.monotonic()
    _docker(dockerd, "network", "create", "-d", plugin.name, "--ipam-driver", plugin.name,
            "-o", "mode=sriov", "-o", f"parent={pf}", "-o", "vfs=2",
            "--subnet", SUBNET, "--gateway", WIRE_PEER_IP, "sr")
    t = _phase("network created (2 VFs enabled)", t)
    assert sriov.num_vfs(pf) == 2
    vf_names = [sriov.vf_netdev(pf, n) for n in range(2)]
    assert all(vf_names), f"both VFs have a netdev in the host namespace: {vf_names}"

    _docker(dockerd, "run", "-d", "--network", "sr", "--ip", C1, "--name", "c1", IMAGE, "sleep", "3600")
    # Per-endpoint options (MAC, rate) travel as `network connect --driver-opt` (docker run has no
    # flag for them in Engine 20.10): create, swap the endpoint for one with options, start.
    _docker(dockerd, "create", "--network", "sr", "--ip", C2, "--name", "c2", IMAGE, "sleep", "3600")
    _docker(dockerd, "network", "disconnect", "sr", "c2")
    _docker(dockerd, "network", "connect", "--ip", C2, "--driver-opt", "rate=100",
            "--driver-opt", f"mac={C2_MAC}", "sr", "c2")
    _docker(dockerd, "start", "c2")
    t = _phase("2 containers running", t)

    seen = {c: _inside(dockerd, c) for c in ("c1", "c2")}
    t = _phase("inside checked", t)
    for c in ("c1", "c2"):
        assert seen[c]["driver"] == "igbvf", f"{c}'s eth0 is not a VF: {seen[c]}"
        assert seen[c]["ping"] == "reached", f"{c} does not reach the peer across the wire: {seen[c]}"
    assert seen["c2"]["mac"] == C2_MAC
    assert sriov.vf_location(pf, 0) == sriov.AWAY and sriov.vf_location(pf, 1) == sriov.AWAY
    lines = _vf_lines(pf)
    assert seen["c1"]["mac"] in lines[0] and "spoof checking on" in lines[0], lines[0]
    assert C2_MAC in lines[1] and "max_tx_rate 100Mbps" in lines[1] and "trust off" in lines[1], lines[1]
    neigh = subprocess.run(["ip", "-n", peer_ns, "neigh"], capture_output=True, text=True).stdout
    assert seen["c1"]["mac"] in neigh and C2_MAC in neigh, f"the peer sees the VFs' own MACs: {neigh}"

    # Pool exhausted: a clear error through the CLI, and nothing kept (endpoint, address).
    addresses = plugin.state_rows("SELECT COUNT(*) FROM ipam_addresses")
    third = _docker(dockerd, "run", "-d", "--network", "sr", "--ip", C3, "--name", "c3", IMAGE,
                    "sleep", "3600", check=False)
    assert third.returncode != 0 and f"no free VF on PF {pf}: 2 of 2 VFs" in third.stderr, third.stderr
    _docker(dockerd, "rm", "c3")
    assert plugin.state_rows("SELECT COUNT(*) FROM ipam_addresses") == addresses
    assert plugin.state_rows("SELECT COUNT(*) FROM endpoints") == [(2,)]
    t = _phase("exhaustion refused", t)

    # A removed container's VF is reset, comes home under its own name and serves the next one.
    _docker(dockerd, "rm", "-f", "c1")
    assert _wait_home(pf, 0), "VF 0 came back to the host namespace"
    assert sriov.vf_netdev(pf, 0) == vf_names[0], "under its own name"
    assert "00:00:00:00:00:00" in _vf_lines(pf)[0], f"VF 0 is reset: {_vf_lines(pf)[0]}"
    _docker(dockerd, "run", "-d", "--network", "sr", "--ip", C3, "--name", "c3", IMAGE, "sleep", "3600")
    assert _inside(dockerd, "c3")["ping"] == "reached"
    assert plugin.state_rows("SELECT vf FROM sriov_vfs WHERE endpoint_id IS NOT NULL ORDER BY vf") == \
        [(0,), (1,)]
    t = _phase("VF reused", t)

    _docker(dockerd, "rm", "-f", "c2", "c3")
    _docker(dockerd, "network", "rm", "sr")
    _phase("containers and network removed", t)
    assert sriov.num_vfs(pf) == 0, "the VFs the network enabled are disabled with it"
    assert [n["name"] for n in dockerd.networks()] == []
    for table in ("networks", "endpoints", "ipam_pools", "ipam_addresses", "sriov_vfs"):
        assert plugin.state_rows(f"SELECT COUNT(*) FROM {table}") == [(0,)], f"{table} not empty"

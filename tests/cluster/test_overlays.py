"""The overlay registry on a real etcd: VNIs unique across hosts (also when allocated at the same
moment), hosts joining one overlay by name, swarm allocation, endpoints and the watch that carries
them to the other hosts."""
from __future__ import annotations

import multiprocessing
import threading
import time

import pytest

from netplugin.cluster.etcd import Etcd
from netplugin.cluster.overlays import SWARM, LocalOverlays, SharedOverlays
from plugincore.errors import Conflict
from plugincore.store import Store


def _overlays(url, prefix, host, lo=4096, hi=8191):
    return SharedOverlays(Etcd(url, prefix, timeout=2.0), host, lo, hi)


def test_hosts_join_one_overlay_by_name(etcd_url, prefix):
    a, b = _overlays(etcd_url, prefix, "hostA"), _overlays(etcd_url, prefix, "hostB")
    vni = a.attach("tenant1", "netA1", None, "10.70.0.0/24")
    assert vni == 4096
    assert a.attach("tenant1", "netA1", None, "10.70.0.0/24") == vni, "attaching twice is a no-op"
    assert b.attach("tenant1", "netB1", None, "10.70.0.0/24") == vni
    assert a.attach("tenant2", "netA2", None, "10.71.0.0/24") == 4097
    with pytest.raises(Conflict, match="overlay tenant1 uses subnet 10.70.0.0/24"):
        b.attach("tenant1", "netB9", None, "10.99.0.0/24")
    with pytest.raises(Conflict, match="already exists with VNI 4096, not 5000"):
        b.attach("tenant1", "netB9", 5000, "10.70.0.0/24")
    with pytest.raises(Conflict, match="VNI 4097 is already used by overlay tenant2"):
        b.attach("tenant3", "netB3", 4097, "10.72.0.0/24")
    # the overlay, its VNI and its endpoints go with the last member
    a.publish("tenant1", "ep1", "02:00:00:00:00:01", "10.70.0.2", "192.168.7.1", "netA1")
    a.detach("tenant1", "netA1")
    a.detach("tenant1", "netA1")  # unknown: done
    assert [e["id"] for e in b.endpoints("tenant1")] == ["ep1"]
    b.detach("tenant1", "netB1")
    assert b.endpoints("tenant1") == []
    assert b.attach("tenant9", "netB9", None, "10.79.0.0/24") == 4096, "the freed VNI is reused"


def _create(url, prefix, host, count, results):
    reg = _overlays(url, prefix, host)
    results.put([reg.attach(f"{host}-o{n}", f"net{n}", None, f"10.{n}.0.0/24") for n in range(count)])


def test_vnis_allocated_at_the_same_moment_are_unique(etcd_url, prefix):
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    procs = [ctx.Process(target=_create, args=(etcd_url, prefix, f"h{n}", 10, results)) for n in range(3)]
    for p in procs:
        p.start()
    vnis = [v for _ in procs for v in results.get(timeout=120)]
    for p in procs:
        p.join(30)
    assert sorted(vnis) == list(range(4096, 4126)), "30 overlays, 30 distinct VNIs, densely"


def test_swarm_allocation_and_free(etcd_url, prefix):
    manager, node = _overlays(etcd_url, prefix, "mgr"), _overlays(etcd_url, prefix, "node1")
    vni = manager.attach("NETID", "NETID", None, "10.73.0.0/24", host=SWARM)
    assert node.attach("NETID", "NETID", vni, "10.73.0.0/24") == vni
    manager.detach_network("NETID", SWARM)  # FreeNetwork: the overlay lives on while node1 uses it
    assert node.attach("NETID", "NETID", vni, "10.73.0.0/24") == vni
    node.detach("NETID", "NETID")
    assert manager.attach("other", "x", None, "10.74.0.0/24") == 4096


def test_endpoint_changes_reach_a_watcher_quickly(etcd_url, prefix):
    a, b = _overlays(etcd_url, prefix, "hostA"), _overlays(etcd_url, prefix, "hostB")
    a.attach("t", "na", None, "10.75.0.0/24")
    _, revision = a.all_endpoints()
    seen: list[tuple[str, float]] = []

    def watch():
        for name, _ in a.watch_endpoints(revision + 1, idle_timeout=3):
            seen.append((name, time.monotonic()))

    watcher = threading.Thread(target=watch)
    watcher.start()
    time.sleep(0.3)
    published = time.monotonic()
    b.publish("t", "epb", "02:00:00:00:00:0b", "10.75.0.9", "192.168.7.2", "nb")
    b.withdraw("t", "epb")
    watcher.join(10)
    assert [name for name, _ in seen] == ["t", "t"]
    print(f"publish -> watcher: {(seen[0][1] - published) * 1000:.1f} ms")
    assert seen[0][1] - published < 1.0


def test_local_registry_keeps_vnis_unique_on_one_host(tmp_path):
    reg = LocalOverlays(Store(str(tmp_path / "db"), LocalOverlays.SCHEMA), 10, 11)
    assert reg.attach("a", "n1", None, "10.1.0.0/24") == 10
    assert reg.attach("a", "n1", None, "10.1.0.0/24") == 10
    assert reg.attach("b", "n2", None, "10.2.0.0/24") == 11
    with pytest.raises(Conflict, match="no free VNI left in 10-11"):
        reg.attach("c", "n3", None, "10.3.0.0/24")
    reg.detach("a", "n1")
    assert reg.attach("c", "n3", None, "10.3.0.0/24") == 10
    assert reg.endpoints("c") == [] and reg.shared is False

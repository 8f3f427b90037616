"""The IPAM driver on a real etcd, as several hosts share it: unique addresses and pools across hosts,
also under concurrent allocation from several processes, reclaim of a dead host, and etcd outages."""
from __future__ import annotations

import multiprocessing
import time

import pytest

from netplugin.cluster.etcd import ClusterUnavailable, Etcd
from netplugin.ipam.shared import SharedIpam
from plugincore.errors import Conflict, InvalidRequest

GATEWAY = {"RequestAddressType": "com.docker.network.gateway"}


def _ipam(url, prefix, host):
    return SharedIpam(Etcd(url, prefix, timeout=2.0), host)


def test_pools_and_addresses_are_shared_between_hosts(etcd_url, prefix):
    a, b = _ipam(etcd_url, prefix, "hostA"), _ipam(etcd_url, prefix, "hostB")
    pool = a.request_pool("local", "10.50.0.0/24", "", {}, False)
    assert b.request_pool("local", "10.50.0.0/24", "", {}, False) == pool
    assert pool["PoolID"] == "local/10.50.0.0/24" and pool["Pool"] == "10.50.0.0/24"
    pid = pool["PoolID"]
    # both networks' gateway requests get the one gateway (shared, counted per host)
    assert a.request_address(pid, "", GATEWAY)["Address"] == "10.50.0.1/24"
    assert b.request_address(pid, "10.50.0.1", GATEWAY)["Address"] == "10.50.0.1/24"
    assert a.request_address(pid, "", {})["Address"] == "10.50.0.2/24"
    assert b.request_address(pid, "", {})["Address"] == "10.50.0.3/24"
    with pytest.raises(Conflict, match="10.50.0.2 is already in use"):
        b.request_address(pid, "10.50.0.2", {})
    with pytest.raises(Conflict, match="overlaps pool 10.50.0.0/24 already in use in the cluster"):
        b.request_pool("local", "10.50.0.128/25", "", {}, False)
    with pytest.raises(InvalidRequest, match="not inside pool"):
        a.request_address(pid, "10.51.0.9", {})
    auto_a = a.request_pool("local", "", "", {}, False)["Pool"]
    auto_b = b.request_pool("local", "", "", {}, False)["Pool"]
    assert auto_a != auto_b, "default pools carved on two hosts never coincide"
    assert a.allocated(pid) == ["10.50.0.1", "10.50.0.2", "10.50.0.3"]

    a.release_address(pid, "10.50.0.2")
    a.release_address(pid, "10.50.0.2")  # unknown: done
    assert b.request_address(pid, "", {})["Address"] == "10.50.0.2/24", "the lowest free one again"
    # the pool stays while host B references it; its addresses go with the last reference
    a.release_pool(pid)
    assert b.allocated(pid) == ["10.50.0.1", "10.50.0.2", "10.50.0.3"]
    b.release_pool(pid)
    assert a.allocated(pid) == [] and pid not in [p["id"] for p in a.pools()]
    a.release_pool(pid)  # unknown: done


def _allocate(url, prefix, host, pool_id, count, results):
    ipam = _ipam(url, prefix, host)
    got = []
    for _ in range(count):
        got.append(ipam.request_address(pool_id, "", {})["Address"])
    results.put(got)


def test_concurrent_allocation_from_many_hosts_never_collides(etcd_url, prefix):
    pool_id = _ipam(etcd_url, prefix, "h0").request_pool("local", "10.60.0.0/24", "", {}, False)["PoolID"]
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    procs = [ctx.Process(target=_allocate, args=(etcd_url, prefix, f"h{n}", pool_id, 25, results))
             for n in range(4)]
    started = time.monotonic()
    for p in procs:
        p.start()
    got = [a for _ in procs for a in results.get(timeout=120)]
    for p in procs:
        p.join(30)
    print(f"4 hosts x 25 allocations at once: {time.monotonic() - started:.2f} s")
    assert len(got) == 100 and len(set(got)) == 100, "every address handed out exactly once"
    assert sorted(got, key=lambda a: int(a.split(".")[3].split("/")[0])) == \
        [f"10.60.0.{n}/24" for n in range(1, 101)], "and densely, lowest first"


def _claim_same(url, prefix, host, pool_id, address, results):
    try:
        results.put(_ipam(url, prefix, host).request_address(pool_id, address, {})["Address"])
    except Conflict as exc:
        results.put(str(exc))


def test_the_same_explicit_address_goes_to_one_host_only(etcd_url, prefix):
    pool_id = _ipam(etcd_url, prefix, "h0").request_pool("local", "10.61.0.0/24", "", {}, False)["PoolID"]
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    procs = [ctx.Process(target=_claim_same, args=(etcd_url, prefix, f"h{n}", pool_id, "10.61.0.7", results))
             for n in range(4)]
    for p in procs:
        p.start()
    got = sorted(results.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(30)
    assert got.count("10.61.0.7/24") == 1 and sum("already in use" in g for g in got) == 3, got


def test_reclaim_gives_back_what_a_dead_host_held(etcd_url, prefix):
    a, b = _ipam(etcd_url, prefix, "hostA"), _ipam(etcd_url, prefix, "hostB")
    pid = a.request_pool("local", "10.62.0.0/24", "", {}, False)["PoolID"]
    b.request_pool("local", "10.62.0.0/24", "", {}, False)
    only_b = b.request_pool("local", "10.63.0.0/24", "", {}, False)["PoolID"]
    a.request_address(pid, "", GATEWAY)
    b.request_address(pid, "10.62.0.1", GATEWAY)
    a.request_address(pid, "10.62.0.10", {})
    b.request_address(pid, "10.62.0.20", {})
    assert a.reclaim("hostB") == {"addresses": 2, "pools": 1}
    assert a.allocated(pid) == ["10.62.0.1", "10.62.0.10"], "the shared gateway stays for host A"
    assert only_b not in [p["id"] for p in a.pools()], "a pool only host B used is gone"
    assert [p["hosts"] for p in a.pools() if p["id"] == pid] == [["hostA"]]


def test_etcd_outage_is_a_clear_error_and_changes_nothing(etcd_server, etcd_url, prefix):
    a = _ipam(etcd_url, prefix, "hostA")
    pid = a.request_pool("local", "10.64.0.0/24", "", {}, False)["PoolID"]
    a.request_address(pid, "", {})
    etcd_server.pause()
    try:
        started = time.monotonic()
        with pytest.raises(ClusterUnavailable, match="cluster store unreachable .*try again when etcd is back"):
            a.request_address(pid, "", {})
        assert time.monotonic() - started < 10, "fails within the configured timeout"
        with pytest.raises(ClusterUnavailable):
            a.request_pool("local", "10.65.0.0/24", "", {}, False)
    finally:
        etcd_server.resume()
    assert a.allocated(pid) == ["10.64.0.1"]
    assert a.request_address(pid, "", {})["Address"] == "10.64.0.2/24", "works again once etcd is back"

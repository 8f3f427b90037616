"""Overlay mode through two real dockerds on two emulated hosts sharing one etcd (tests/lab/overlay.py:
each host a netns with its own dockerd, plugin instance, state directory and host_id; etcd on the
emulated underlay's switch)."""
from __future__ import annotations

import time

import pytest

from tests.lab.etcd import skip_reason as etcd_skip_reason
from tests.lab.overlay import ETCD_IP, ETCD_PREFIX, OverlayLab

pytestmark = pytest.mark.e2e
T1, T2 = "10.88.0.0/24", "10.89.0.0/24"


@pytest.fixture(scope="module")
def overlay_lab(busybox_tar, tmp_path_factory):
    reason = etcd_skip_reason()
    if reason:
        pytest.skip(reason)
    the_lab = OverlayLab(tmp_path_factory.mktemp("overlay"))
    try:
        the_lab.start(busybox_tar)
        yield the_lab.lab, the_lab.etcd, the_lab.hosts
    finally:
        the_lab.destroy()


def test_overlay_spans_two_docker_hosts_and_has_no_way_out(overlay_lab):
    lab, etcd, (a, b) = overlay_lab
    for host in (a, b):
        host.network("t1", "tenant1", T1)
        host.network("t2", "tenant2", T2)
    a.run("a1", "t1")
    b.run("b2", "t2")
    started = time.monotonic()
    b.run("b1", "t1")
    ran = time.monotonic()
    while not a.reaches("a1", b.ip("b1")):
        assert time.monotonic() - ran < 10, "a1 never reached b1"
    print(f"docker run on host B took {ran - started:.2f} s; a1 reached b1 {time.monotonic() - ran:.2f} s later")
    ips = {a.ip("a1"), b.ip("b1"), b.ip("b2")}
    assert len(ips) == 3 and a.ip("a1").startswith("10.88.0.") and b.ip("b2").startswith("10.89.0.")
    assert b.reaches("b1", a.ip("a1"))
    # no way out: not another overlay, not the hosts, not the underlay
    for target in (b.ip("b2"), a.underlay_ip, b.underlay_ip, ETCD_IP):
        assert not a.reaches("a1", target), f"a1 reached {target}"
    assert not lab.ping(a.ns, a.ip("a1")), "host A reaches its own container"
    routes = a.docker("exec", "a1", "ip", "route").stdout
    assert "default" not in routes, routes
    nat = lab.sh(a.ns, ["iptables-save", "-t", "nat"]).stdout
    assert "10.88." not in nat and "MASQUERADE" not in nat, nat
    assert "docker_gwbridge" not in lab.links(a.ns)

    # the plugin on host A dies and comes back: data plane untouched, the agent catches up
    a.plugin.kill()
    assert a.reaches("a1", b.ip("b1")), "killing the plugin does not cut running containers off"
    a.plugin.start()
    b.run("b3", "t1")
    ran = time.monotonic()
    while not a.reaches("a1", b.ip("b3")):
        assert time.monotonic() - ran < 10, "a1 never reached b3 after the plugin restart"

    # etcd unreachable: a clear error, nothing half-made; fine again once it is back
    etcd.pause()
    try:
        failed = a.run("a9", "t1", check=False)
    finally:
        etcd.resume()
    assert failed.returncode != 0 and "cluster store unreachable" in failed.stderr, failed.stderr
    a.docker("rm", "-f", "a9")
    a.run("a4", "t1")
    assert b.reaches("b1", a.ip("a4"))

    for host in (a, b):
        host.dockerd.remove_all_containers(timeout=60)
        host.docker("network", "rm", "t1", "t2")
        assert host.owned_links() == [], host.owned_links()
    left = etcd.etcdctl("get", "--prefix", ETCD_PREFIX, "--keys-only").stdout.split()
    # only the liveness records and the per-space revision guard of pool creation stay
    assert [k for k in left if not k.startswith((ETCD_PREFIX + "hosts/", ETCD_PREFIX + "ipam/spaces/"))] == [], left

"""Takeover of a dead holder with fencing, the admin break-lock, and a dead cluster, against a small
private cluster whose osd_client_watch_timeout is 5 s (a dead client's watch - and so its claim on
a volume - outlives it that long; 30 s by default).

"Dead host" = its rbd-fuse (the writer) killed with SIGKILL, or frozen with SIGSTOP and resumed after
the takeover: the resumed writer's data must never reach the image (it is blocklisted).
"""
from __future__ import annotations

import os
import signal
import time

import pytest

from plugincore.errors import BackendError, Conflict, NotFound
from tests.lab.ceph import destroy_cluster, skip_reason, throwaway_cluster
from tests.lab.rbd import MiB, Hosts, fuse_pid, read_image, wait_for_watch_expiry

pytest.importorskip("rados")
pytestmark = pytest.mark.kernel  # root, loop devices, FUSE, and real Ceph clusters

WATCH_TIMEOUT = 5
GRACE = 2


@pytest.fixture(scope="module")
def fast_ceph(_ceph_session_guard, tmp_path_factory):
    reason = skip_reason()
    if reason:
        pytest.skip(f"embedded Ceph unavailable: {reason}")
    cluster = throwaway_cluster(tmp_path_factory.mktemp("fastceph"), store_gib=2, watch_timeout=WATCH_TIMEOUT)
    yield cluster
    destroy_cluster(cluster)


@pytest.fixture
def lab(fast_ceph, tmp_path):
    hosts = Hosts(fast_ceph, tmp_path / "hosts", op_timeout=5, fence_grace=GRACE)
    yield hosts
    errors = hosts.cleanup()
    assert not errors, errors


def attempts_until_attached(backend, spec, timeout: float) -> tuple[str, list[str]]:
    """Retry attach like an orchestrator would; return the device and the refusals seen."""
    refusals, deadline = [], time.monotonic() + timeout
    while True:
        try:
            return backend.attach(spec), refusals
        except Conflict as exc:
            refusals.append(str(exc))
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def test_kill_9_holder_is_fenced_and_taken_over(lab):
    a, b = lab.host("host-a"), lab.host("host-b")
    spec = lab.volume(64 * MiB)
    a.create(spec)
    mnt = lab.mkfs_and_mount(a.attach(spec), "a")
    (mnt / "before.txt").write_text("synced before the crash\n")
    os.sync()
    killed_at = time.monotonic()
    os.kill(fuse_pid(a, spec), signal.SIGKILL)  # host-a "dies" with the filesystem mounted

    device, refusals = attempts_until_attached(b, spec, WATCH_TIMEOUT + GRACE + 20)
    took = time.monotonic() - killed_at
    assert any(f"in use on host host-a" in r for r in refusals), refusals  # watch not expired yet
    assert any("can be taken over (fencing that host) from" in r for r in refusals), refusals
    assert WATCH_TIMEOUT + GRACE - 1 <= took <= WATCH_TIMEOUT + GRACE + 15, took
    holder = b.holder(spec)
    assert holder.host == "host-b" and holder.alive
    mnt_b = lab.mount(device, "b")
    assert (mnt_b / "before.txt").read_text() == "synced before the crash\n"

    # host-a comes back: its attachment is half-dead, it cannot attach, its detach leaves b alone
    assert a.attached() == {}
    with pytest.raises(Conflict, match="in use on host host-b"):
        a.attach(spec)
    lab.unmount(mnt)  # what the driver's reconciliation does before detaching
    a.detach(spec)
    assert a.records.all() == [] and b.holder(spec).host == "host-b"
    assert (mnt_b / "before.txt").read_text() == "synced before the crash\n"


def test_sigstop_holder_is_fenced_and_its_late_writes_never_land(lab):
    a, b = lab.host("host-a"), lab.host("host-b")
    spec = lab.volume(16 * MiB)
    a.create(spec)
    fd = os.open(a.attach(spec), os.O_RDWR | os.O_DSYNC)
    try:
        os.pwrite(fd, b"A" * 4096, 0)
        pid = fuse_pid(a, spec)
        os.kill(pid, signal.SIGSTOP)  # frozen, not dead: the classic split brain
        try:
            wait_for_watch_expiry(b, spec, WATCH_TIMEOUT + 20)
            device, _ = attempts_until_attached(b, spec, GRACE + 20)
            fd_b = os.open(device, os.O_RDWR | os.O_DSYNC)
            os.pwrite(fd_b, b"B" * 8192, 0)
            os.close(fd_b)
        finally:
            os.kill(pid, signal.SIGCONT)
        # the resumed writer may have a write or two acknowledged from its cache, but the OSDs
        # refuse them (blocklisted) and it soon fails outright
        failure = None
        deadline = time.monotonic() + 20
        while failure is None and time.monotonic() < deadline:
            try:
                os.pwrite(fd, b"C" * 4096, 4096)
                os.fsync(fd)
                time.sleep(0.2)
            except OSError as exc:
                failure = exc
        assert failure is not None and failure.errno == 5, failure
    finally:
        os.close(fd)
    assert read_image(lab.cluster.conf_path, lab.cluster.pool, spec.name, 0, 8192) == b"B" * 8192
    a.detach(spec)  # the stuck, fenced rbd-fuse is killed by the detach watchdog
    assert a.records.all() == [] and b.holder(spec).host == "host-b"


def test_break_lock_fences_a_live_holder_at_once(lab):
    a, b = lab.host("host-a"), lab.host("host-b")
    spec = lab.volume(16 * MiB)
    a.create(spec)
    fd = os.open(a.attach(spec), os.O_RDWR | os.O_DSYNC)
    try:
        with pytest.raises(Conflict, match="in use on host host-a"):
            b.attach(spec)
        broken = b.break_lock(spec)
        assert broken.host == "host-a" and broken.alive and broken.addresses
        assert b.holder(spec) is None
        device = b.attach(spec)  # no watch to wait for: fencing dropped it
        assert b.holder(spec).host == "host-b"
        fd_b = os.open(device, os.O_RDWR | os.O_DSYNC)
        os.pwrite(fd_b, b"B" * 4096, 0)
        os.close(fd_b)
        with pytest.raises(OSError):
            for _ in range(50):
                os.pwrite(fd, b"A" * 4096, 0)
                os.fsync(fd)
                time.sleep(0.2)
    finally:
        os.close(fd)
    assert read_image(lab.cluster.conf_path, lab.cluster.pool, spec.name, 0, 4096) == b"B" * 4096
    b.detach(spec)
    with pytest.raises(NotFound, match="not held"):
        b.break_lock(spec)
    a.detach(spec)


def test_dead_cluster_gives_errors_within_the_timeouts(own_ceph, tmp_path):
    hosts = Hosts(own_ceph, tmp_path / "hosts", connect_timeout=3, op_timeout=3)
    try:
        a = hosts.host("host-a")
        spec = hosts.volume(16 * MiB)
        a.create(spec)
        own_ceph.stop()
        for call in (a.info, a.exists, a.attach, a.holder, a.remove):
            started = time.monotonic()
            with pytest.raises(BackendError):
                call(spec)
            assert time.monotonic() - started < 3 + 5 + 1, call.__name__
        a.cluster.drop()  # a fresh connection: bounded by connect_timeout
        started = time.monotonic()
        with pytest.raises(BackendError, match="cannot connect to the Ceph cluster"):
            a.create(hosts.volume())
        assert time.monotonic() - started < 3 + 5 + 1
        a.detach(spec)  # nothing attached: no cluster needed, no error
    finally:
        hosts.images.clear()  # the cluster is gone with its images
        assert hosts.cleanup() == []

"""volplugin.backends.rbd.RbdBackend against the shared throwaway Ceph cluster (the ``ceph`` fixture).

Two backends with their own host_id and state_dir play two hosts. Attachments go through rbd-fuse +
a loop device (this kernel has neither krbd nor nbd); the takeover of dead holders (fencing) and a
dead cluster are in test_rbd_fencing.py.
"""
from __future__ import annotations

import os
import time

import pytest

from plugincore.errors import Conflict, InvalidRequest, NotFound
from tests.lab import sh
from tests.lab.rbd import MiB, Hosts, fuse_pid, purge_images

rados = pytest.importorskip("rados")
rbd = pytest.importorskip("rbd")

pytestmark = pytest.mark.kernel  # root, loop devices, FUSE, and a real Ceph cluster


@pytest.fixture
def lab(ceph, tmp_path):
    hosts = Hosts(ceph, tmp_path / "hosts")
    yield hosts
    errors = hosts.cleanup()
    assert not errors, errors


def blockdev_size(device: str) -> int:
    return int(sh(["blockdev", "--getsize64", device]).stdout)


def test_create_is_idempotent_and_refuses_another_size(lab):
    a = lab.host("host-a")
    spec = lab.volume(64 * MiB)
    assert a.create(spec) == {"pool": lab.cluster.pool, "image": spec.name}
    assert a.create(spec) == {"pool": lab.cluster.pool, "image": spec.name}
    assert a.exists(spec)
    spec.size = 128 * MiB
    with pytest.raises(Conflict, match=f"{spec.name} already exists with a different size"):
        a.create(spec)
    info = a.info(spec)
    assert info["size"] == 64 * MiB
    assert set(info["features"]) == {"layering", "exclusive-lock"}
    assert info["holder"] is None and info["snapshots"] == []


def test_missing_pool_and_unknown_volume(lab):
    a = lab.host("host-a")
    spec = lab.volume(pool="no-such-pool")
    with pytest.raises(NotFound, match="pool 'no-such-pool' does not exist"):
        a.create(spec)
    assert not a.exists(spec)
    a.remove(spec)  # unknown = success
    a.detach(spec)
    missing = lab.volume()
    assert not a.exists(missing)
    a.remove(missing)
    a.detach(missing)
    assert a.holder(missing) is None
    with pytest.raises(NotFound, match=missing.name):
        a.attach(missing)
    with pytest.raises(InvalidRequest):
        a.create(lab.volume(size=0))


def test_two_hosts_hand_a_filesystem_over(lab):
    a, b = lab.host("host-a"), lab.host("host-b")
    spec = lab.volume(128 * MiB)
    a.create(spec)
    started = time.monotonic()
    device = a.attach(spec)
    attach_seconds = time.monotonic() - started
    assert device.startswith("/dev/loop")
    assert a.attach(spec) == device  # idempotent on the same host
    assert a.attached() == {spec.name: device}
    holder = a.holder(spec)
    assert holder.host == "host-a" and holder.alive and holder.addresses
    mnt = lab.mkfs_and_mount(device, "a")
    (mnt / "data").mkdir()
    (mnt / "data" / "hello.txt").write_text("written on host-a\n")
    lab.unmount(mnt)
    started = time.monotonic()
    a.detach(spec)
    detach_seconds = time.monotonic() - started
    assert a.attached() == {} and a.holder(spec) is None
    assert not os.path.exists(a.methods["fuse"].directory(lab.cluster.pool, spec.name))
    device_b = b.attach(spec)
    assert b.holder(spec).host == "host-b"
    mnt_b = lab.mount(device_b, "b")
    assert (mnt_b / "data" / "hello.txt").read_text() == "written on host-a\n"
    lab.unmount(mnt_b)
    b.detach(spec)
    b.detach(spec)  # twice = success
    print(f"\nfuse attach {attach_seconds:.3f}s, detach {detach_seconds:.3f}s")
    assert attach_seconds < 5 and detach_seconds < 5


def test_default_method_order_falls_back_to_fuse(lab):
    a = lab.host("host-a", attach_methods=("krbd", "nbd", "fuse"))
    usable = [name for name in ("krbd", "nbd") if a.methods[name].usable()]
    if usable:
        pytest.skip(f"this kernel has {', '.join(usable)}: the fuse fallback is not what runs")
    spec = lab.volume()
    a.create(spec)
    assert a.attach(spec).startswith("/dev/loop")
    assert a.records.load(lab.cluster.pool, spec.name)["method"] == "fuse"
    with pytest.raises(ValueError, match="unknown attach methods"):
        lab.host("host-b", attach_methods=("iscsi",))


def test_second_host_is_refused_and_cannot_detach_the_holder(lab):
    a, b = lab.host("host-a"), lab.host("host-b")
    spec = lab.volume()
    a.create(spec)
    device = a.attach(spec)
    with pytest.raises(Conflict, match=f"volume {spec.name} is in use on host host-a since 20"):
        b.attach(spec)
    b.detach(spec)  # a host that does not hold it detaches nothing
    assert a.attached() == {spec.name: device}
    assert a.holder(spec).host == "host-a"
    with pytest.raises(Conflict, match="host-a"):
        b.remove(spec)
    with pytest.raises(Conflict, match="held by this host"):
        a.break_lock(spec)
    assert b.attached() == {}
    a.detach(spec)
    assert b.attach(spec).startswith("/dev/loop")


def test_half_dead_attachment_is_reported_and_cleaned(lab):
    a = lab.host("host-a")
    spec = lab.volume()
    a.create(spec)
    a.attach(spec)
    os.kill(fuse_pid(a, spec), 9)
    time.sleep(0.2)
    assert a.attached() == {}
    assert a.cleanup_orphans() == [spec.name]
    assert a.records.all() == []
    assert not a.methods["fuse"].leftovers(lab.cluster.pool, spec.name)
    # our own dead client was fenced on release, so this host can attach again at once
    device = a.attach(spec)
    assert a.attached() == {spec.name: device}


def test_snapshots_rollback_and_clone(lab):
    a = lab.host("host-a")
    spec = lab.volume(64 * MiB)
    a.create(spec)
    device = a.attach(spec)
    mnt = lab.mkfs_and_mount(device, "a")
    (mnt / "v.txt").write_text("version 1\n")
    lab.unmount(mnt)  # the driver would freeze instead; unmounting is just as consistent
    a.snapshot_create(spec, "s1")
    with pytest.raises(Conflict, match="already exists"):
        a.snapshot_create(spec, "s1")
    with pytest.raises(InvalidRequest):
        a.snapshot_create(spec, "../bad")
    mnt = lab.mount(device, "a")
    (mnt / "v.txt").write_text("version 2\n")
    lab.unmount(mnt)
    snaps = a.snapshot_list(spec)
    assert [s["name"] for s in snaps] == ["s1"] and snaps[0]["size"] == 64 * MiB
    assert snaps[0]["created"].endswith("Z")
    with pytest.raises(Conflict, match="in use on host host-a"):
        a.snapshot_rollback(spec, "s1")
    a.detach(spec)
    with pytest.raises(NotFound):
        a.snapshot_rollback(spec, "nope")
    a.snapshot_rollback(spec, "s1")
    mnt = lab.mount(a.attach(spec), "a")
    assert (mnt / "v.txt").read_text() == "version 1\n"
    (mnt / "v.txt").write_text("version 3\n")
    lab.unmount(mnt)

    clone = lab.volume(size=0)  # size 0: the source snapshot's size
    assert a.create(clone, clone_from=(spec.name, "s1"))["image"] == clone.name
    a.create(clone, clone_from=(spec.name, "s1"))  # idempotent
    info = a.info(clone)
    assert info["parent"] == f"{spec.name}@s1" and info["size"] == 64 * MiB and info["holder"] is None
    mnt_c = lab.mount(a.attach(clone), "clone")
    assert (mnt_c / "v.txt").read_text() == "version 1\n"
    lab.unmount(mnt_c)
    with pytest.raises(NotFound, match="nope"):
        a.create(lab.volume(size=0), clone_from=(spec.name, "nope"))
    with pytest.raises(InvalidRequest, match="smaller"):
        a.create(lab.volume(size=MiB), clone_from=(spec.name, "s1"))

    a.snapshot_remove(spec, "s1")  # the clone keeps it alive in the snapshot trash
    a.snapshot_remove(spec, "s1")  # unknown = success
    assert a.snapshot_list(spec) == []
    mnt_c = lab.mount(a.attach(clone), "clone")
    assert (mnt_c / "v.txt").read_text() == "version 1\n"
    lab.unmount(mnt_c)


def test_resize_grows_the_attached_device(lab):
    a = lab.host("host-a")
    spec = lab.volume(64 * MiB)
    a.create(spec)
    device = a.attach(spec)
    assert blockdev_size(device) == 64 * MiB
    a.resize(spec, 96 * MiB)
    assert a.info(spec)["size"] == 96 * MiB
    assert blockdev_size(device) == 96 * MiB
    a.resize(spec, 96 * MiB)  # same size: nothing to do
    with pytest.raises(InvalidRequest, match="shrinking"):
        a.resize(spec, 32 * MiB)
    b = lab.host("host-b")
    with pytest.raises(Conflict, match="grow it on that host"):
        b.resize(spec, 128 * MiB)


def test_remove_is_refused_while_attached_then_moves_to_trash(lab):
    a = lab.host("host-a", trash_retention=3600)
    spec = lab.volume()
    a.create(spec)
    a.attach(spec)
    with pytest.raises(Conflict, match=f"volume {spec.name} is in use on host host-a"):
        a.remove(spec)
    a.detach(spec)
    a.remove(spec)
    assert not a.exists(spec)
    a.remove(spec)  # unknown = success
    client = a.cluster.client()
    with client.open_ioctx(lab.cluster.pool) as ioctx:
        trashed = [e for e in rbd.RBD().trash_list(ioctx) if e["name"] == spec.name]
    assert len(trashed) == 1
    deferment = (trashed[0]["deferment_end_time"] - trashed[0]["deletion_time"]).total_seconds()
    assert 3590 <= deferment <= 3610
    assert purge_images(lab.cluster.conf_path, [(lab.cluster.pool, spec.name)]) == []


def test_catalog_is_shared_between_hosts(lab):
    a, b = lab.host("host-a"), lab.host("host-b")
    name = lab.volume().name
    assert b.catalog_get(name) is None
    a.catalog_put(name, {"options": {"size": 64 * MiB}, "created_at": "2026-01-01T00:00:00Z"})
    assert b.catalog_get(name) == {"options": {"size": 64 * MiB}, "created_at": "2026-01-01T00:00:00Z"}
    assert name in b.catalog_list()
    b.catalog_delete(name)
    b.catalog_delete(name)  # unknown = success
    assert a.catalog_get(name) is None and name not in a.catalog_list()

"""krbd, the RBD backend's kernel attach method (rbd_devices.Krbd), in the VM lane: this host's kernel
has no rbd module, the lane's stock Debian kernel has. One throwaway single-node Ceph cluster per
module runs inside the guest; the backend under test maps with ``attach_methods=("krbd",)`` only.

The cluster's OSD uses memstore, not bluestore: the guest's writable filesystems are all tmpfs, which
refuses the O_DIRECT bluestore opens its block file with (its mkfs fails with EINVAL in the 6.1
guest), and the few MiB these tests write fit in the OSD's memory in a 2.5 GiB guest.

"Hosts" A and B are backends with their own host_id and state_dir on the one guest kernel, so B sees
A's mappings in sysfs, which a real second host never would: B never detaches while A holds a volume
(its detach would unmap A's device as a leftover of its own).
"""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest

from plugincore.errors import Conflict
from tests.lab import mounts_under, sh
from tests.lab.ceph import destroy_cluster, skip_reason, throwaway_cluster
from tests.lab.rbd import MiB, Hosts
from tests.lab.volaudit import krbd_mappings
from volplugin.backends.base import VolumeSpec

pytestmark = pytest.mark.vm


def sysfs_size(device: str) -> int:
    """The kernel's idea of the device's size (sectors of 512 bytes in /sys/block/rbdN/size)."""
    return int(Path("/sys/block", os.path.basename(device), "size").read_text()) * 512


def unmap_by_hand(device: str, *options: str, check: bool = True):
    """An admin's ``rbd device unmap`` (no udev in the guest: it would wait for one)."""
    return sh(["rbd", "device", "unmap", "--device-type", "krbd", "--options",
               ",".join(["noudev", *options]), device], timeout=60, check=check)


def force_unmap_all(images=None) -> list[str]:
    """Unmap every krbd mapping (of ``images``, if given) even if in use; the errors met."""
    errors = []
    for device, image in krbd_mappings().items():
        if images is None or image in images:
            proc = unmap_by_hand(device, "force", check=False)
            if proc.returncode:
                errors.append(f"unmap {device} ({image[0]}/{image[1]}): {proc.stderr.strip()}")
    return errors


class KrbdHosts(Hosts):
    """Hosts whose backends attach with krbd only. Teardown also unmaps (forcibly) every mapping of the
    test's images, recorded or not, before Hosts.cleanup() purges them: a mapped image cannot be
    removed, and a test that failed half-way may leave mappings no backend records."""

    def __init__(self, cluster, root: Path):
        super().__init__(cluster, root, attach_methods=("krbd",))

    def cleanup(self) -> list[str]:
        for target in mounts_under(self.root):
            sh(["umount", "-l", target], check=False, timeout=30)
        self.mounted.clear()
        errors = force_unmap_all(set(self.images))
        return errors + super().cleanup()


@pytest.fixture(scope="module")
def timings():
    """Measured seconds by what; printed (pytest -s) and saved as krbd-timings.json in the results
    directory the lane shares with the host."""
    measured: dict[str, float] = {}
    yield measured
    print("\nkrbd timings:", json.dumps(measured))
    results = os.environ.get("NETPLUGIN_VM_RESULTS")
    if results and os.path.isdir(results):
        Path(results, "krbd-timings.json").write_text(json.dumps(measured, indent=1) + "\n")


@pytest.fixture(scope="module")
def guest_ceph(vm, _ceph_session_guard, tmp_path_factory, timings):
    """One memstore cluster in the guest's /tmp for the whole module."""
    reason = skip_reason()
    if reason:
        pytest.skip(f"embedded Ceph unavailable: {reason}")
    vm.modprobe("rbd")
    cluster = throwaway_cluster(tmp_path_factory.mktemp("krbd"), start=False, store_gib=1,
                                objectstore="memstore")
    try:
        started = time.monotonic()
        cluster.ensure_running(timeout=120)
        timings["cluster_start"] = round(time.monotonic() - started, 2)
        yield cluster
    finally:
        # a kernel client of a cluster that is gone retries forever: unmap first
        leftovers = krbd_mappings()
        errors = force_unmap_all()
        destroy_cluster(cluster)
    assert not leftovers and not errors, f"krbd mappings left behind: {leftovers} {errors}"


@pytest.fixture
def lab(guest_ceph, tmp_path):
    hosts = KrbdHosts(guest_ceph, tmp_path / "hosts")
    yield hosts
    errors = hosts.cleanup()
    assert not errors, errors


def timed(timings: dict, what: str, fn, *args):
    started = time.monotonic()
    result = fn(*args)
    timings.setdefault(what, round(time.monotonic() - started, 3))
    return result


def test_attach_maps_with_krbd_and_the_data_survives_detach(lab, timings):
    a = lab.host("host-a")
    spec = lab.volume(64 * MiB)
    a.create(spec)
    device = timed(timings, "attach (map)", a.attach, spec)
    assert re.fullmatch(r"/dev/rbd\d+", device), device
    assert krbd_mappings() == {device: (lab.cluster.pool, spec.name)}
    assert Path(device).is_block_device(), "no udev in the guest: devtmpfs must have made the node"
    assert a.records.load(lab.cluster.pool, spec.name)["method"] == "krbd"
    assert a.attached() == {spec.name: device}
    assert a.attach(spec) == device  # idempotent
    holder = a.holder(spec)
    assert holder.host == "host-a" and holder.alive and holder.addresses  # the kernel client watches
    mnt = lab.mkfs_and_mount(device, "a")
    (mnt / "hello.txt").write_text("written through krbd\n")
    lab.unmount(mnt)
    timed(timings, "detach (unmap)", a.detach, spec)
    assert krbd_mappings() == {} and not os.path.exists(device)
    assert a.attached() == {} and a.holder(spec) is None
    a.detach(spec)  # twice = success

    device = a.attach(spec)
    mnt = lab.mount(device, "a")
    assert (mnt / "hello.txt").read_text() == "written through krbd\n"
    lab.unmount(mnt)
    a.detach(spec)
    assert krbd_mappings() == {}


def test_second_host_is_refused_until_the_holder_detaches(lab):
    a, b = lab.host("host-a"), lab.host("host-b")
    spec = lab.volume(64 * MiB)
    a.create(spec)
    device = a.attach(spec)
    mnt = lab.mkfs_and_mount(device, "a")
    (mnt / "owner.txt").write_text("host-a\n")
    with pytest.raises(Conflict, match=f"volume {spec.name} is in use on host host-a since 20"):
        b.attach(spec)
    # refused without touching A's device (B sees it in this shared kernel as a "leftover")
    assert krbd_mappings() == {device: (lab.cluster.pool, spec.name)}
    assert a.attached() == {spec.name: device} and b.attached() == {}
    assert (mnt / "owner.txt").read_text() == "host-a\n"
    lab.unmount(mnt)
    a.detach(spec)

    device_b = b.attach(spec)
    assert b.holder(spec).host == "host-b"
    assert krbd_mappings() == {device_b: (lab.cluster.pool, spec.name)}
    with pytest.raises(Conflict, match="in use on host host-b"):
        a.attach(spec)
    mnt = lab.mount(device_b, "b")
    assert (mnt / "owner.txt").read_text() == "host-a\n"
    lab.unmount(mnt)
    b.detach(spec)
    assert krbd_mappings() == {} and b.holder(spec) is None


def test_snapshot_and_grow_while_mapped(lab, timings):
    """librbd snapshots and resizes while the kernel client holds the image's exclusive lock (it
    wrote): krbd must hand the lock over, take it back to write again, and follow the header update
    to the new size by the time resize() returns (refresh_size does nothing for krbd)."""
    from volplugin import filesystem

    a = lab.host("host-a")
    spec = lab.volume(64 * MiB)
    a.create(spec)
    device = a.attach(spec)
    assert sysfs_size(device) == 64 * MiB
    mnt = lab.mkfs_and_mount(device, "a")
    (mnt / "v.txt").write_text("version 1\n")
    filesystem.freeze(str(mnt))  # what the driver does around a snapshot of a mounted volume
    try:
        timed(timings, "snapshot while mapped", a.snapshot_create, spec, "s1")
    finally:
        filesystem.thaw(str(mnt))
    with open(mnt / "v.txt", "w") as f:  # the kernel client takes the lock back to write
        f.write("version 2\n")
        f.flush()
        os.fsync(f.fileno())
    assert [s["name"] for s in a.snapshot_list(spec)] == ["s1"]

    timed(timings, "resize while mapped", a.resize, spec, 96 * MiB)
    assert sysfs_size(device) == 96 * MiB, "the kernel did not follow the resize"
    with open(device, "rb") as f:
        assert f.seek(0, os.SEEK_END) == 96 * MiB  # the block layer's view too
    assert a.attached() == {spec.name: device}
    holder = a.holder(spec)
    assert holder.host == "host-a" and holder.alive, "the kernel client lost its watch"
    assert (mnt / "v.txt").read_text() == "version 2\n"
    lab.unmount(mnt)

    clone = lab.volume(size=0)
    a.create(clone, clone_from=(spec.name, "s1"))
    mnt_c = lab.mount(a.attach(clone), "clone")
    assert (mnt_c / "v.txt").read_text() == "version 1\n", "the snapshot missed the frozen write"
    lab.unmount(mnt_c)
    a.detach(clone)
    a.detach(spec)
    assert krbd_mappings() == {}


def test_orphaned_mappings_are_found_and_unmapped(lab, timings):
    a = lab.host("host-a")
    spec = lab.volume(64 * MiB)
    pool = lab.cluster.pool
    a.create(spec)
    device = a.attach(spec)

    # A restarted plugin (a new backend on the same state directory) finds its mapping healthy.
    again = lab.host("host-a")
    assert again.attached() == {spec.name: device}
    assert again.cleanup_orphans() == []
    assert krbd_mappings() == {device: (pool, spec.name)}

    # Unmapped behind the plugin's back: a half-dead record, cleaned up and released.
    unmap_by_hand(device)
    assert again.attached() == {}
    assert again.cleanup_orphans() == [spec.name]
    assert again.records.all() == [] and again.holder(spec) is None

    # The plugin died between mapping and recording (or lost its state directory): no local
    # record, but the cluster names this host as the holder.
    device = again.attach(spec)
    again.records.drop(pool, spec.name)
    assert again.attached() == {}
    assert again.cleanup_orphans() == [spec.name]
    assert krbd_mappings() == {} and again.holder(spec) is None

    # A mapping volplugin did not make (an admin's `rbd device map`) is not its to remove.
    out = timed(timings, "rbd device map (CLI)", sh, ["rbd", "device", "map", "--device-type", "krbd",
                "--options", "noudev", f"{pool}/{spec.name}", "--conf", lab.cluster.conf_path]).stdout
    manual = out.split()[-1]
    assert again.cleanup_orphans() == []
    assert krbd_mappings() == {manual: (pool, spec.name)}
    timed(timings, "rbd device unmap (CLI)", unmap_by_hand, manual)


def test_driver_grows_online_and_reconciles(lab):
    """Through volplugin.driver.VolumeDriver (as tests/ceph/test_volume_driver.py builds it): online
    grow of a mounted krbd volume, and start-up reconciliation of its mapping after a restart."""
    from volplugin import config as volconfig, filesystem
    from volplugin.admin import Admin
    from volplugin.reconcile import reconcile
    from volplugin.service import Services

    state_dir = lab.root / "hostA-state"

    def driver():  # a (re)started plugin: new objects on the same state directories
        config = volconfig.load(overrides={"state_dir": str(state_dir), "host_id": "hostA"}, environ={})
        config["rbd"].update(conf=lab.cluster.conf_path, pool=lab.cluster.pool)
        return Services(config, backends={"rbd": lab.host("hostA")}).driver

    a = driver()
    name = lab.volume().name
    a.create(name, {"size": "64M", "fs": "ext4"})
    mountpoint = a.mount(name, "c1")
    device = filesystem.mount_source(mountpoint)
    assert krbd_mappings() == {device: (lab.cluster.pool, name)}
    before = filesystem.usage(mountpoint)["size"]
    Admin(a).grow(name, "128M")  # resize, then resize2fs on the device at once
    assert filesystem.usage(mountpoint)["size"] > before * 1.5, "the mounted filesystem did not grow"

    assert reconcile(driver())["kept"] == 1
    assert krbd_mappings() == {device: (lab.cluster.pool, name)}
    sh(["umount", mountpoint])  # the mount vanished behind the plugin's back
    assert reconcile(driver())["released"] == 1
    assert krbd_mappings() == {}

    # The plugin died between attaching and mounting: an attachment no mount explains.
    lab.host("hostA").attach(VolumeSpec(name=name, size=0,
                                        backend_data={"pool": lab.cluster.pool, "image": name}))
    assert reconcile(driver())["orphan_attachments"] == 1
    assert krbd_mappings() == {}

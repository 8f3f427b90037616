"""Crash-injection torture of a served volplugin attaching with krbd (tests/lab/voltorture.py), in the VM
lane: this host's kernel has no rbd module. The same random Create/Mount/Unmount/Remove as the rbd-fuse
torture (tests/ceph/test_torture_volplugin.py), with kill -9 of the whole plugin between and in the middle
of requests, on a memstore cluster in the guest (OSD stops: only on the host, see below). The audit checks the
kernel's krbd mappings (sysfs, not the code under test) against the attachments: a mapping outlives a
killed plugin, so every one must be found again or unmapped. TORTURE_OPS operations (40 here: emulation
is slow); at the end no mapping, image or state row is left."""
import os
import random
import time
import uuid

import pytest

from tests.lab.ceph import destroy_cluster, skip_reason, throwaway_cluster
from tests.lab.plugin import rbd_volplugin
from tests.lab.volaudit import ceph_images, krbd_mappings
from tests.lab.voltorture import VolTorture, state_row_counts
from tests.vm.test_krbd import force_unmap_all

pytestmark = pytest.mark.vm
ROUND = 10


@pytest.fixture
def guest_ceph(vm, _ceph_session_guard, tmp_path):
    reason = skip_reason()
    if reason:
        pytest.skip(f"embedded Ceph unavailable: {reason}")
    vm.modprobe("rbd")
    cluster = throwaway_cluster(tmp_path / "ceph", start=False, store_gib=1, objectstore="memstore")
    try:
        cluster.ensure_running(timeout=180)
        yield cluster
    finally:
        leftovers = krbd_mappings()  # a kernel client of a cluster that is gone retries forever
        errors = force_unmap_all()
        destroy_cluster(cluster)
    assert not leftovers and not errors, f"krbd mappings left behind: {leftovers} {errors}"


def test_kill_9_and_osd_stops_leave_no_krbd_mapping(guest_ceph, tmp_path):
    seed = int(os.environ.get("TORTURE_SEED", random.randrange(1 << 30)))
    operations = int(os.environ.get("TORTURE_OPS", 40))
    plugin = rbd_volplugin(tmp_path / "plugin", guest_ceph, prefix="vpkrbd", op_timeout=20.0).start(timeout=120)
    prefix = "vk" + uuid.uuid4().hex[:6] + "-"
    torture = VolTorture(plugin, guest_ceph, random.Random(seed), prefix=prefix, attach="krbd")
    # No OSD stops here: a restarted memstore OSD in the emulated guest left its PGs without I/O for
    # minutes. OSD outages are tortured on the host (rbd-fuse), and krbd waits them out in the kernel.
    torture.osd_rate = 0
    started = time.monotonic()
    try:
        torture.run(operations, ROUND, fault_rate=0.15)
        torture.teardown()
        # the plugin attaches with krbd here (not rbd-fuse): what the audit's mapping check relies on
        probe = f"{prefix}probe"
        plugin.call("/VolumeDriver.Create", {"Name": probe, "Opts": {"size": "64M", "fs": "ext4"}})
        plugin.call("/VolumeDriver.Mount", {"Name": probe, "ID": "probe"})
        mapped = [image for _, image in krbd_mappings().values()]
        plugin.call("/VolumeDriver.Unmount", {"Name": probe, "ID": "probe"})
        plugin.call("/VolumeDriver.Remove", {"Name": probe})
        assert probe in mapped, f"a mounted volume is not mapped with krbd: {mapped}"
        torture.audit("after removing everything")
        left = ceph_images(guest_ceph, prefix)
        rows = state_row_counts(plugin)
        if left or any(rows.values()) or krbd_mappings():
            torture.findings.append(f"at the end: images {sorted(left)}, plugin rows {rows}, "
                                    f"mappings {krbd_mappings()}")
    finally:
        torture.report(f"krbd volume torture ({time.monotonic() - started:.0f} s)", seed)
        plugin.destroy()
    assert "Traceback" not in plugin.log.read_text(errors="replace"), plugin.log_tail(80)
    assert torture.findings == []


"""LVM volumes do not wait on Ceph. LVM reads a label from every block device; the RBD backend's
attachments here are loop devices over rbd-fuse files, whose reads wait for the OSDs without a timeout
(so that no write is lost). Before volplugin kept LVM away from them, an OSD outage made every lvm
command hang until its timeout: every request on a local LVM volume, and a plugin's start-up."""
import threading
import time

import pytest

from tests.ceph.test_volume_driver import cluster  # noqa: F401 - the fixture
from volplugin.backends import lvm_devices
from volplugin.backends.lvm_command import Lvm, no_udev_config

pytestmark = pytest.mark.kernel


class UnfilteredLvm(Lvm):
    """volplugin's LVM wrapper as it was: scans every block device."""

    def config(self) -> str:
        return no_udev_config(self.monitoring)


def _drop_page_cache() -> None:
    # the label LVM reads may still be cached from the mount; only a read that reaches rbd-fuse waits
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def test_lvm_answers_while_the_osds_of_an_attached_rbd_volume_are_down(cluster):
    a = cluster.driver("hostA")
    name = cluster.name()
    a.create(name, {"size": "64M", "fs": "ext4"})
    a.mount(name, "c1")
    loops = lvm_devices.loops_over_rbd_fuse()
    assert loops, "the RBD volume is attached through rbd-fuse and a loop device on this host"
    for device, major_minor in loops:
        assert f"r|^/dev/{device}$|" in lvm_devices.reject_patterns()
        assert f"r|^/dev/block/{major_minor}$|" in lvm_devices.reject_patterns()
    cluster.ceph.stop_osd()
    try:
        _drop_page_cache()
        started = time.monotonic()
        Lvm(timeout=20, monitoring=False).report("pvs", fields="pv_name")
        filtered = time.monotonic() - started
        assert filtered < 10, f"lvm pvs took {filtered:.1f} s with the OSD down"

        # The proof that the outage reaches a scan without the filter: it waits (in the kernel, where
        # not even SIGKILL ends it) until the OSD is back.
        _drop_page_cache()
        unfiltered = threading.Thread(
            target=lambda: UnfilteredLvm(timeout=120, monitoring=False).report("pvs", fields="pv_name"))
        unfiltered.start()
        unfiltered.join(8)
        assert unfiltered.is_alive(), "an unfiltered lvm scan did not wait on the outage: the test proves nothing"
    finally:
        cluster.ceph.start_osd()
    unfiltered.join(120)
    assert not unfiltered.is_alive()
    a.unmount(name, "c1")
    a.remove(name)

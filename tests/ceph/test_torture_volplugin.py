"""Crash-injection torture of a served volplugin on its own throwaway Ceph (tests/lab/voltorture.py):
TORTURE_OPS random volume operations as dockerd makes them (40 in the suite; `bash bench/torture.sh
volplugin` runs 1,000), with kill -9 of the whole plugin between and in the middle of requests, restarts,
and stops of the cluster's OSD; data written at every mount must survive. An audit of state against this
host, Ceph and "Docker" after every round and at the end, once everything was removed. Prints the counts
of operations, faults and findings; any finding fails the test."""
import os
import random
import uuid

import pytest

from tests.lab.plugin import rbd_volplugin
from tests.lab.rbd import end_attachments_under
from tests.lab.volaudit import ceph_images
from tests.lab.voltorture import VolTorture, state_row_counts

pytestmark = pytest.mark.kernel
ROUND = 10


def test_kill_9_and_osd_stops_at_random_points_leak_nothing(own_ceph, tmp_path):
    seed = int(os.environ.get("TORTURE_SEED", random.randrange(1 << 30)))
    operations = int(os.environ.get("TORTURE_OPS", 40))
    plugin = rbd_volplugin(tmp_path, own_ceph, prefix="vptort", op_timeout=6.0).start()
    prefix = "vt" + uuid.uuid4().hex[:6] + "-"
    torture = VolTorture(plugin, own_ceph, random.Random(seed), prefix=prefix)
    try:
        torture.run(operations, ROUND, fault_rate=0.12)
        if not torture.counts["OSD stops"]:  # the short run meets at least one
            torture.osd_stop_start()
            torture.audit("after an OSD stop")
        torture.teardown()
        torture.audit("after removing everything")
        left = ceph_images(own_ceph, prefix)
        plugin_rows = state_row_counts(plugin)
        if left or any(plugin_rows.values()):
            torture.findings.append(f"at the end: images {sorted(left)}, plugin rows {plugin_rows}")
    finally:
        torture.report("volume torture", seed)
        plugin.destroy()
        end_attachments_under(plugin.workdir)  # what a failed run left attached (rbd-fuse outlives kills)
    log = plugin.log.read_text(errors="replace")
    assert "Traceback" not in log, plugin.log_tail(80)
    assert torture.findings == []


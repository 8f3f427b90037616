"""Crash-injection torture of a served netplugin on SR-IOV networks (tests/lab/torture.py), in the VM
lane: the igb PF's VFs go to endpoints and come back while kill -9 hits the whole plugin between and in
the middle of requests. The audit (tests/lab/audit.py) adds the VF inventory: every claim an endpoint's,
every SR-IOV endpoint one VF, no pool of a gone network, every VF netdev at home. TORTURE_OPS operations
(30 here: every VF reset costs seconds under emulation); at the end the PF has no VF enabled."""
import os
import random
from pathlib import Path

import pytest
from pyroute2 import IPRoute, netns as pr_netns

from tests.lab.plugin import Plugin
from tests.lab.torture import NetTorture

pytestmark = pytest.mark.vm
ROUND = 10


class SriovTorture(NetTorture):
    """As dockerd: a joined endpoint's VF moves into the container's namespace, and comes back (under its
    own name) when the container stops. Start-up reconciliation frees the VF of a joined endpoint that is
    at home (its container is gone), so the VF must really leave."""

    def enter_sandbox(self, ep: dict, joined: dict) -> None:
        src, sandbox = joined["InterfaceName"]["SrcName"], f"sb{self._id()[:10]}"
        pr_netns.create(sandbox)
        ep["sandbox"] = (sandbox, src)
        with IPRoute() as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname=src)[0], net_ns_fd=sandbox)

    def leave_sandbox(self, ep: dict) -> None:
        sandbox, src = ep.pop("sandbox")
        with IPRoute(netns=sandbox) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname=src)[0], net_ns_pid=1)
        pr_netns.remove(sandbox)


def test_kill_9_with_vfs_in_flight_leaks_no_vf(wire, tmp_path):
    pf, _, _ = wire
    seed = int(os.environ.get("TORTURE_SEED", random.randrange(1 << 30)))
    operations = int(os.environ.get("TORTURE_OPS", 30))
    plugin = Plugin(None, tmp_path / "plugin").start(timeout=60)  # the guest's initial netns: where VFs appear
    torture = SriovTorture(plugin, [pf], random.Random(seed), network_options={"mode": "sriov", "vfs": "3"})
    try:
        torture.run(operations, ROUND, fault_rate=0.15)
        torture.teardown()
        torture.audit("after removing everything")
        [(networks, endpoints, vfs)] = plugin.state_rows(
            "SELECT (SELECT count(*) FROM networks), (SELECT count(*) FROM endpoints), "
            "(SELECT count(*) FROM sriov_vfs)")
        orphans = len(torture.orphans)
        if networks + endpoints + vfs > 3 * orphans:
            torture.findings.append(f"at the end: {networks} networks, {endpoints} endpoints, {vfs} VFs "
                                    "in the inventory")
        enabled = int(Path(f"/sys/class/net/{pf}/device/sriov_numvfs").read_text())
        if enabled and not orphans:
            torture.findings.append(f"at the end: {enabled} VFs still enabled on {pf}")
    finally:
        torture.report("SR-IOV torture", seed)
        plugin.destroy()
        for ep in torture.endpoints.values():  # a failed run: give the VFs back before the wire goes
            if "sandbox" in ep:
                pr_netns.remove(ep["sandbox"][0])
    assert "Traceback" not in plugin.log.read_text(errors="replace"), plugin.log_tail(80)
    assert torture.findings == []

"""Crash-injection torture of a served netplugin (tests/lab/torture.py): TORTURE_OPS random operations as
dockerd makes them (200 in the suite; `bash bench/torture.sh` runs 1,000), with kill -9 of the whole plugin
between and in the middle of requests and restarts, on static networks (a parent NIC each) and VXLAN overlay
networks (VNIs from the plugin's own registry), an audit of state against kernel and "Docker" after
every round of 25 and at the end, once everything was removed. Prints the counts of operations, faults and
findings; any finding fails the test."""
import json
import os
import random
from pathlib import Path

from pyroute2 import IPRoute

from tests.lab.plugin import Plugin
from tests.lab.torture import NetTorture

ROUND = 25


def test_kill_9_at_random_points_leaks_nothing(lab, tmp_path):
    with IPRoute() as ipr:  # a second parent NIC, so that two networks can live side by side
        ipr.link("add", ifname="eth2", kind="veth", peer={"ifname": "r1", "net_ns_fd": lab.router})
        # and an underlay with an address for VXLAN overlay networks (any number, a VNI each)
        ipr.link("add", ifname="eth3", kind="veth", peer={"ifname": "r3", "net_ns_fd": lab.router})
        eth3 = ipr.link_lookup(ifname="eth3")[0]
        ipr.addr("add", index=eth3, address="10.88.0.2", prefixlen=24)
        ipr.link("set", index=eth3, state="up")
    seed = int(os.environ.get("TORTURE_SEED", random.randrange(1 << 30)))
    operations = int(os.environ.get("TORTURE_OPS", 200))
    plugin = Plugin(lab.host, tmp_path / "plugin")
    plugin.start()
    torture = NetTorture(plugin, ["eth1", "eth2"], random.Random(seed), underlay="eth3")
    try:
        torture.run(operations, ROUND, fault_rate=0.12)
        torture.teardown()
        torture.audit("after removing everything")
        [(networks, endpoints, pools, addresses)] = plugin.state_rows(
            "SELECT (SELECT count(*) FROM networks), (SELECT count(*) FROM endpoints), "
            "(SELECT count(*) FROM ipam_pools), (SELECT count(*) FROM ipam_addresses)")
        lost = sum(torture.lost_addresses.values())
        orphans = len(torture.orphans)
        if networks + endpoints > orphans or pools > torture.lost_pools + orphans or addresses > lost + 2 * orphans:
            torture.findings.append(f"at the end: {networks} networks, {endpoints} endpoints, {pools} pools, "
                                    f"{addresses} addresses left ({torture.lost_pools} pool and {lost} address "
                                    "replies were lost in kills)")
    finally:
        torture.report("torture", seed, f", {sum(torture.lost_addresses.values())} RequestAddress and "
                       f"{torture.lost_pools} RequestPool replies lost in kills")
        if os.environ.get("TORTURE_TRACE"):  # every call in order, with kills: to follow up a finding
            Path(os.environ["TORTURE_TRACE"]).write_text(json.dumps(torture.trace))
        plugin.destroy()
    log = plugin.log.read_text(errors="replace")
    assert "Traceback" not in log, plugin.log_tail(80)
    assert torture.findings == []

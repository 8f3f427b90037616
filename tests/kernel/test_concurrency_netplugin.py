"""Concurrency against a served netplugin (4 gunicorn workers x 4 threads, separate processes): parallel
requests for the same network and the same parent never corrupt state or hand out an address twice; the
per-object locks serialize them (or refuse a loser with a clear error), never deadlock. The audit
(tests/lab/audit.py) checks state against kernel afterwards."""
from concurrent.futures import ThreadPoolExecutor

from pyroute2 import IPRoute

from tests.lab import plugin_post
from tests.lab.audit import audit_netplugin
from tests.lab.plugin import Plugin

SUBNET, GATEWAY = "10.77.0.0/22", "10.77.0.1/22"
CONTAINERS = 64


def _serve(lab, tmp_path) -> Plugin:
    config = tmp_path / "netplugin.toml"
    config.write_text("workers = 4\nthreads = 4\n")
    return Plugin(lab.host, tmp_path / "plugin", extra_args=("--config", str(config))).start()


def _call(plugin, route, body):
    status, reply = plugin_post(plugin.socket, route, body, timeout=120)
    return status, reply


def test_parallel_networks_on_one_parent_one_wins(lab, tmp_path):
    with IPRoute() as ipr:
        ipr.link("add", ifname="eth2", kind="veth", peer={"ifname": "r1", "net_ns_fd": lab.router})
    plugin = _serve(lab, tmp_path)
    try:
        ids = [f"{i:02x}" * 32 for i in range(1, 13)]

        def create(net_id):
            return _call(plugin, "/NetworkDriver.CreateNetwork", {
                "NetworkID": net_id, "Options": {"com.docker.network.generic": {"parent": "eth1"}},
                "IPv4Data": [{"AddressSpace": "local", "Pool": "10.78.0.0/24", "Gateway": "10.78.0.1/24"}],
                "IPv6Data": []})
        with ThreadPoolExecutor(len(ids)) as pool:
            results = list(pool.map(create, ids))
        winners = [i for i, (status, _) in zip(ids, results) if status == 200]
        losers = [reply for status, reply in results if status != 200]
        assert len(winners) == 1, results
        assert all(r["Err"] == r["Error"] and "eth1" in r["Err"] for r in losers), losers
        assert plugin.state_rows("SELECT id FROM networks") == [(winners[0],)]
        assert audit_netplugin(plugin.state_dir / "netplugin.db", parents=["eth1", "eth2"]) == []
        assert _call(plugin, "/NetworkDriver.DeleteNetwork", {"NetworkID": winners[0]})[0] == 200
        assert audit_netplugin(plugin.state_dir / "netplugin.db", parents=["eth1", "eth2"]) == []
    finally:
        plugin.destroy()


def test_parallel_containers_on_one_network_get_distinct_addresses(lab, tmp_path):
    plugin = _serve(lab, tmp_path)
    net = "c1" * 32
    try:
        status, pool = _call(plugin, "/IpamDriver.RequestPool", {"AddressSpace": "local", "Pool": SUBNET})
        assert status == 200
        pool_id = pool["PoolID"]
        assert _call(plugin, "/IpamDriver.RequestAddress", {
            "PoolID": pool_id, "Address": GATEWAY.split("/")[0],
            "Options": {"RequestAddressType": "com.docker.network.gateway"}})[0] == 200
        assert _call(plugin, "/NetworkDriver.CreateNetwork", {
            "NetworkID": net, "Options": {"com.docker.network.generic": {"parent": "eth1", "egress": "50mbit"}},
            "IPv4Data": [{"AddressSpace": "local", "Pool": SUBNET, "Gateway": GATEWAY}], "IPv6Data": []})[0] == 200

        def run(i):  # what dockerd does for `docker run`, all containers at once
            ep = f"{i:064x}"
            status, reply = _call(plugin, "/IpamDriver.RequestAddress", {"PoolID": pool_id, "Address": "",
                                                                         "Options": None})
            assert status == 200, reply
            address = reply["Address"]
            for route, body in (("CreateEndpoint", {"Interface": {"Address": address},
                                                     "Options": {"egress": "5mbit"} if i % 2 else {}}),
                                ("Join", {"SandboxKey": f"/var/run/docker/netns/{i}", "Options": {}})):
                status, reply = _call(plugin, f"/NetworkDriver.{route}", {"NetworkID": net, "EndpointID": ep, **body})
                assert status == 200, (route, reply)
            return ep, address

        def stop(item):
            ep, address = item
            for route in ("Leave", "DeleteEndpoint"):
                assert _call(plugin, f"/NetworkDriver.{route}", {"NetworkID": net, "EndpointID": ep})[0] == 200
            assert _call(plugin, "/IpamDriver.ReleaseAddress", {"PoolID": pool_id,
                                                                "Address": address.split("/")[0]})[0] == 200

        with ThreadPoolExecutor(16) as pool:
            started = list(pool.map(run, range(1, CONTAINERS + 1)))
        addresses = [a for _, a in started]
        assert len(set(addresses)) == CONTAINERS and GATEWAY not in addresses
        held = {(pool_id, a.split("/")[0]) for a in addresses} | {(pool_id, GATEWAY.split("/")[0])}
        db = plugin.state_dir / "netplugin.db"
        assert audit_netplugin(db, parents=["eth1"], held_addresses=held) == []
        # every one shaped: half by their option, the others by the network default
        assert plugin.state_rows("SELECT count(*) FROM shape_classes") == [(CONTAINERS,)]

        with ThreadPoolExecutor(16) as pool:
            list(pool.map(stop, started))
        assert audit_netplugin(db, parents=["eth1"], held_addresses={(pool_id, GATEWAY.split("/")[0])}) == []
        assert plugin.state_rows("SELECT count(*) FROM endpoints") == [(0,)]
        assert _call(plugin, "/NetworkDriver.DeleteNetwork", {"NetworkID": net})[0] == 200
        assert "Traceback" not in plugin.log.read_text(errors="replace")
    finally:
        plugin.destroy()

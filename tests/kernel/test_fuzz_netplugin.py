"""Protocol fuzzing of a served netplugin (gunicorn, 2 workers) in a throwaway netns with a real parent NIC
(eth1): FUZZ_REQUESTS requests (tests/lab/fuzz.py) to its socket. Every answer must be a clear Docker-style
error or a success, never an internal error; no traceback in the plugin's log; the plugin still answers; and
once what succeeded is undone (through the protocol, as Docker would), state and kernel are as before."""
import json
import os
import subprocess
import sys

from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyroute2 import IPRoute

from tests.lab import REPO_ROOT
from tests.lab.fuzz import Fuzzer, hex_id, request_count, requests, sqlite_snapshot, values
from tests.lab.plugin import Plugin

NET_A, NET_B = "a1" * 32, "b2" * 32
EP_A = "e3" * 32
ROUTES = [f"/NetworkDriver.{r}" for r in (
    "GetCapabilities", "CreateNetwork", "DeleteNetwork", "AllocateNetwork", "FreeNetwork", "CreateEndpoint",
    "DeleteEndpoint", "EndpointOperInfo", "Join", "Leave", "DiscoverNew", "DiscoverDelete",
    "ProgramExternalConnectivity", "RevokeExternalConnectivity")] + [f"/IpamDriver.{r}" for r in (
        "GetCapabilities", "GetDefaultAddressSpaces", "RequestPool", "ReleasePool", "RequestAddress",
        "ReleaseAddress")] + ["/Plugin.Activate"]
OPTION_KEYS = ["mode", "parent", "mtu", "vlan", "egress", "ingress", "overlay", "vni", "internal",
               "com.docker.network.driver.mtu", "bogus"]
POOLS = ["10.77.0.0/24", "10.77.0.0/16", "10.78.0.0/24", "fd00::/64", "10.77.0.0/33", "0.0.0.0/0"]
ADDRESSES = ["10.77.0.5", "10.77.0.5/24", "10.77.0.1", "10.77.0.255", "10.99.0.1", "fd00::5", "bad"]


def _fields() -> dict:
    network_id = st.one_of(st.sampled_from([NET_A, NET_B]), hex_id())
    generic = st.dictionaries(st.sampled_from(OPTION_KEYS), st.one_of(
        st.sampled_from(["static", "vlan", "overlay", "sriov", "eth1", "1400", "100", "10mbit", "1gbit"]),
        values()), max_size=4)
    ipdata = st.lists(st.fixed_dictionaries({}, optional={
        "AddressSpace": st.sampled_from(["local", "global", "nope"]), "Pool": st.sampled_from(POOLS),
        "Gateway": st.sampled_from(["10.77.0.1/24", "10.77.0.1", "10.99.0.1/24"]),
        "AuxAddresses": values()}), max_size=2)
    return {
        "NetworkID": network_id, "EndpointID": st.one_of(st.just(EP_A), hex_id()),
        "Options": st.one_of(st.fixed_dictionaries({}, optional={
            "com.docker.network.generic": generic, "com.docker.network.internal": st.booleans(),
            "com.docker.network.enable_ipv6": st.booleans()}), generic),
        "IPv4Data": ipdata, "IPv6Data": ipdata,
        "Interface": st.fixed_dictionaries({}, optional={
            "Address": st.sampled_from(ADDRESSES), "AddressIPv6": st.sampled_from(["", "fd00::5/64"]),
            "MacAddress": st.sampled_from(["", "02:42:ac:11:00:02", "ff:ff:ff:ff:ff:ff", "zz"])}),
        "SandboxKey": st.sampled_from(["/var/run/docker/netns/x", "/proc/1/ns/net", "../../etc", ""]),
        "PoolID": st.sampled_from(["local/10.77.0.0/24", "global/10.78.0.0/24", "local/", "x/y/z"]),
        "Pool": st.sampled_from(POOLS), "SubPool": st.sampled_from(["", "10.77.0.128/25", "10.1.0.0/24"]),
        "AddressSpace": st.sampled_from(["local", "global", "other"]), "Address": st.sampled_from(ADDRESSES),
        "V6": st.booleans(), "DiscoveryType": st.integers(-1, 3), "DiscoveryData": values(),
    }


def _valid() -> dict:
    """Well-formed bodies on the few IDs and the one subnet, so that real networks, endpoints, pools and
    addresses come and go between the odd requests."""
    network_id, endpoint_id = st.sampled_from([NET_A, NET_B]), st.sampled_from([EP_A, "f4" * 32])
    generic = st.fixed_dictionaries({"parent": st.just("eth1")}, optional={
        "mode": st.just("static"), "mtu": st.sampled_from(["1400", "1500", "9000", "abc", "0"]),
        "egress": st.sampled_from(["10mbit", "1gbit", "0", "-1mbit", "fast"]),
        "ingress": st.sampled_from(["5mbit", ""])})
    ipv4 = [{"AddressSpace": "local", "Pool": "10.77.0.0/24", "Gateway": "10.77.0.1/24"}]
    ids = {"NetworkID": network_id, "EndpointID": endpoint_id}
    return {
        "/NetworkDriver.CreateNetwork": st.fixed_dictionaries({
            "NetworkID": network_id, "Options": st.builds(lambda g: {"com.docker.network.generic": g}, generic),
            "IPv4Data": st.just(ipv4), "IPv6Data": st.just([])}),
        "/NetworkDriver.DeleteNetwork": st.fixed_dictionaries({"NetworkID": network_id}),
        "/IpamDriver.RequestPool": st.fixed_dictionaries({
            "AddressSpace": st.just("local"), "Pool": st.just("10.77.0.0/24"),
            "SubPool": st.sampled_from(["", "10.77.0.128/25"]), "Options": st.just({}), "V6": st.just(False)}),
        "/IpamDriver.RequestAddress": st.fixed_dictionaries({
            "PoolID": st.just("local/10.77.0.0/24"), "Address": st.sampled_from(["", "10.77.0.5", "10.77.0.1"]),
            "Options": st.sampled_from([None, {}, {"RequestAddressType": "com.docker.network.gateway"}])}),
        "/IpamDriver.ReleaseAddress": st.fixed_dictionaries({
            "PoolID": st.just("local/10.77.0.0/24"), "Address": st.sampled_from(["10.77.0.5", "10.77.0.1"])}),
        "/NetworkDriver.CreateEndpoint": st.fixed_dictionaries({
            **ids, "Interface": st.sampled_from([{"Address": "10.77.0.5/24"}, {"Address": "10.77.0.6/24"}, {}]),
            "Options": st.sampled_from([{}, {"egress": "5mbit"}, {"ingress": "bogus"}])}),
        "/NetworkDriver.Join": st.fixed_dictionaries({**ids, "SandboxKey": st.just("/var/run/docker/netns/x"),
                                                      "Options": st.just({})}),
        "/NetworkDriver.Leave": st.fixed_dictionaries(ids),
        "/NetworkDriver.DeleteEndpoint": st.fixed_dictionaries(ids),
    }


UNDO = {  # success -> the call that gives it back, as Docker would make it
    "/NetworkDriver.CreateNetwork": lambda b, r: ("/NetworkDriver.DeleteNetwork", {"NetworkID": b["NetworkID"]}),
    "/NetworkDriver.AllocateNetwork": lambda b, r: ("/NetworkDriver.FreeNetwork", {"NetworkID": b["NetworkID"]}),
    "/NetworkDriver.CreateEndpoint": lambda b, r: ("/NetworkDriver.DeleteEndpoint",
                                                   {"NetworkID": b["NetworkID"], "EndpointID": b["EndpointID"]}),
    "/NetworkDriver.Join": lambda b, r: ("/NetworkDriver.Leave",
                                         {"NetworkID": b["NetworkID"], "EndpointID": b["EndpointID"]}),
    "/IpamDriver.RequestPool": lambda b, r: ("/IpamDriver.ReleasePool", {"PoolID": r["PoolID"]}),
    "/IpamDriver.RequestAddress": lambda b, r: ("/IpamDriver.ReleaseAddress", {
        "PoolID": b.get("PoolID"), "Address": r["Address"].split("/")[0]}),
}


def _status(plugin) -> dict:
    out = subprocess.run([sys.executable, "-m", "netplugin", "status", "--json", "--state-dir",
                          str(plugin.state_dir)], capture_output=True, text=True, timeout=60, check=True,
                         cwd=REPO_ROOT).stdout
    status = json.loads(out)
    return {k: status[k] for k in ("networks", "endpoints", "pools")}


def _kernel() -> dict:
    with IPRoute() as ipr:
        links = sorted(link.get_attr("IFLA_IFNAME") for link in ipr.get_links())
        eth1 = ipr.link_lookup(ifname="eth1")[0]
        link = ipr.get_links(eth1)[0]
        master, state = link.get_attr("IFLA_MASTER"), link.get_attr("IFLA_OPERSTATE")
        # the kernel's own default qdisc appears once a link has been up: not the plugin's
        qdiscs = sorted(q.get_attr("TCA_KIND") for q in ipr.get_qdiscs(eth1)
                        if q.get_attr("TCA_KIND") not in ("noqueue", "pfifo_fast", "fq_codel"))
    rules = [ln for ln in subprocess.run(["iptables-save"], capture_output=True, text=True, timeout=30,
                                         check=True).stdout.splitlines() if ln.startswith("-A NETPLUGIN")]
    sets = subprocess.run(["ipset", "list", "-o", "save"], capture_output=True, text=True, timeout=30,
                          check=True).stdout.splitlines()
    return {"links": links, "eth1 master": master, "eth1 state": state, "eth1 qdiscs": qdiscs, "rules": rules,
            "ipset entries": sorted(ln for ln in sets if ln.startswith("add "))}


def test_fuzzed_requests_get_clear_errors_and_change_nothing(lab, tmp_path):
    plugin = Plugin(lab.host, tmp_path / "plugin")
    plugin.start()
    try:
        fuzzer = Fuzzer(plugin.socket, sqlite_snapshot(plugin.state_dir / "netplugin.db"))
        before = (_status(plugin), _kernel())

        @settings(max_examples=request_count(), deadline=None, database=None, derandomize=False,
                  suppress_health_check=list(HealthCheck))
        @given(requests(ROUTES, _fields(), _valid()))
        def one(request):
            fuzzer.check(*request)
        one()
        print(f"\nnetplugin fuzz: {fuzzer.summary()}")
        if os.environ.get("FUZZ_DUMP"):  # the successful calls, in order: a replay reproduces the state
            Path(os.environ["FUZZ_DUMP"]).write_text(json.dumps([[r, b] for r, b, _ in fuzzer.successes]))

        for route, body, reply in reversed(fuzzer.successes):
            if route in UNDO:
                status, answer = fuzzer.post(*UNDO[route](body, reply))
                assert status == 200, (route, body, answer)
        assert fuzzer.post("/Plugin.Activate", {})[0] == 200, "the plugin still answers"
        assert (_status(plugin), _kernel()) == before
        log = plugin.log.read_text(errors="replace")
        assert "Traceback" not in log and " ERROR " not in log, plugin.log_tail(60)
    finally:
        plugin.destroy()

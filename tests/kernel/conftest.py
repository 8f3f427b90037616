"""Kernel tests run the driver inside throwaway network namespaces: the test thread enters a fresh
netns (so pyroute2 sockets and iptables calls act there), and a "router" netns sits on the far end
of the parent NIC, like the physical router of the real deployment."""
import ctypes
import os
import uuid

import pytest
from pyroute2 import IPRoute, netns

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)

pytestmark = pytest.mark.kernel


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "setns failed")


class Lab:
    """Names and helpers of one kernel test's namespaces."""

    def __init__(self):
        tag = uuid.uuid4().hex[:6]
        self.host = f"kt{tag}h"
        self.router = f"kt{tag}r"
        self.extra: list[str] = []

    def add_ns(self, suffix: str) -> str:
        name = f"{self.host[:-1]}{suffix}"
        netns.create(name)
        self.extra.append(name)
        return name


@pytest.fixture
def lab():
    if os.geteuid() != 0:
        pytest.skip("kernel tests need root")
    lab = Lab()
    netns.create(lab.host)
    netns.create(lab.router)
    original = os.open("/proc/self/ns/net", os.O_RDONLY)
    try:
        with IPRoute(netns=lab.host) as ipr:
            ipr.link("add", ifname="eth1", kind="veth", peer={"ifname": "r0", "net_ns_fd": lab.router})
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        with IPRoute(netns=lab.router) as ipr:
            idx = ipr.link_lookup(ifname="r0")[0]
            ipr.addr("add", index=idx, address="10.77.0.1", prefixlen=24)
            ipr.link("set", index=idx, state="up")
        target = os.open(f"/run/netns/{lab.host}", os.O_RDONLY)
        try:
            _setns(target)
        finally:
            os.close(target)
        yield lab
    finally:
        _setns(original)
        os.close(original)
        for name in [lab.host, lab.router, *lab.extra]:
            try:
                netns.remove(name)
            except OSError:
                pass


def plug_container(lab, driver, network_id: str, endpoint_id: str, address: str, options: dict | None = None):
    """CreateEndpoint + Join, then what Docker does after Join: move the container end into a sandbox
    netns, rename it, set its address and the default route. Returns (sandbox, CreateEndpoint reply,
    Join reply)."""
    reply = driver.create_endpoint(network_id, endpoint_id, {"Address": f"{address}/24"}, options or {})
    join = driver.join(network_id, endpoint_id, "/var/run/docker/netns/test")
    sandbox = lab.add_ns(endpoint_id[:4])
    src = join["InterfaceName"]["SrcName"]
    with IPRoute() as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname=src)[0], net_ns_fd=sandbox)
    with IPRoute(netns=sandbox) as ipr:
        idx = ipr.link_lookup(ifname=src)[0]
        ipr.link("set", index=idx, ifname="eth0", state="up")
        ipr.addr("add", index=idx, address=address, prefixlen=24)
        if join.get("Gateway"):
            ipr.route("add", dst="0.0.0.0/0", gateway=join["Gateway"])
    return sandbox, reply, join

"""netplugin's garbage collection against Docker's lists (netplugin/docker_gc.py), on a real driver in a
throwaway netns: Docker's lists are given to sweep() as Docker would answer, and the clock is the test's.
The same through a real dockerd: tests/e2e/test_torture_e2e.py::test_a_network_docker_forgot_is_collected."""
import pytest
from pyroute2 import IPRoute

from netplugin import config as netconfig
from netplugin.docker_gc import DockerGC, Listed
from netplugin.kernel import links
from netplugin.service import Services

pytestmark = pytest.mark.kernel
IPV4 = [{"AddressSpace": "local", "Pool": "10.77.0.0/24", "Gateway": "10.77.0.1/24"}]
KNOWN, FORGOTTEN = "a1" * 32, "b2" * 32
UNJOINED, JOINED, LISTED = "e1" * 32, "e2" * 32, "e3" * 32
NOTHING = {"networks": 0, "endpoints": 0, "pool references": 0, "addresses": 0}


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def _link(name):
    with IPRoute() as ipr:
        return links.get_link(ipr, name)


def test_what_docker_forgot_is_collected_after_the_grace_only(lab, tmp_path):
    with IPRoute() as ipr:  # a second parent: the forgotten network holds one for itself
        ipr.link("add", ifname="eth2", kind="veth", peer={"ifname": "r1", "net_ns_fd": lab.router})
    driver = Services(netconfig.load(overrides={"state_dir": str(tmp_path / "state")})).driver
    driver.create_network(KNOWN, {"com.docker.network.generic": {"parent": "eth1"}}, IPV4, [])
    driver.create_network(FORGOTTEN, {"com.docker.network.generic": {"parent": "eth2"}},
                          [{"AddressSpace": "local", "Pool": "10.78.0.0/24", "Gateway": "10.78.0.1/24"}], [])
    for ep, address in ((UNJOINED, "10.77.0.10/24"), (JOINED, "10.77.0.11/24"), (LISTED, "10.77.0.12/24")):
        driver.create_endpoint(KNOWN, ep, {"Address": address}, {})
    driver.join(KNOWN, JOINED, "/var/run/docker/netns/x")
    clock = Clock()
    gc = DockerGC(driver, "unix:///nowhere", grace=120, clock=clock)
    docker = {KNOWN: Listed(frozenset({LISTED})), "c3" * 32: Listed()}  # not FORGOTTEN, not UNJOINED

    assert gc.sweep(docker) == NOTHING  # first seen missing: marked only
    clock.now = 119
    assert gc.sweep(docker) == NOTHING
    clock.now = 120
    assert gc.sweep(docker) == dict(NOTHING, networks=1, endpoints=1)
    assert driver.state.get_network(FORGOTTEN) is None and _link("npb-" + FORGOTTEN[:11]) is None
    assert _link("eth2").master is None, "the parent is free for the next network"
    assert {ep.id for ep in driver.state.endpoints()} == {JOINED, LISTED}, "joined or listed: kept"
    assert driver.state.get_network(KNOWN) is not None and _link("npb-" + KNOWN[:11]) is not None
    clock.now = 1000
    assert gc.sweep(docker) == NOTHING

    # Missing, listed again (a CreateEndpoint whose Join came late, a dockerd that was restarting), missing
    # again: the grace starts over.
    driver.create_endpoint(KNOWN, UNJOINED, {"Address": "10.77.0.10/24"}, {})
    gc.sweep(docker)
    clock.now = 1100
    gc.sweep({KNOWN: Listed(frozenset({LISTED, UNJOINED}))})
    clock.now = 1150
    assert gc.sweep(docker) == NOTHING
    clock.now = 1270
    assert gc.sweep(docker) == dict(NOTHING, endpoints=1)

    driver.leave(KNOWN, JOINED)
    for ep in (JOINED, LISTED):
        driver.delete_endpoint(KNOWN, ep)
    driver.delete_network(KNOWN)

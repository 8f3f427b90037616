"""The garbage collection of IPAM allocations against Docker's networks (netplugin/docker_gc.py) on the real
local IPAM: what a RequestPool or RequestAddress whose reply was cut leaves is released after the grace;
what Docker's networks hold, and anything on networks this host cannot see whole, never is.
The same through a real dockerd: tests/e2e/test_torture_e2e.py::test_cut_ipam_replies_are_collected."""
from netplugin import config as netconfig
from netplugin.docker_gc import DockerGC, docker_network
from netplugin.ipam import Ipam
from netplugin.service import Services

NOTHING = {"networks": 0, "endpoints": 0, "pool references": 0, "addresses": 0}


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def _inspect(subnet: str, gateway: str, endpoints: dict, *, scope="local", ip_range="", aux=None) -> dict:
    """A network as `docker network inspect` shows it (API 1.41)."""
    return {"Scope": scope, "IPAM": {"Driver": "netplugin", "Config": [
        {"Subnet": subnet, "Gateway": gateway, **({"IPRange": ip_range} if ip_range else {}),
         **({"AuxiliaryAddresses": aux} if aux else {})}]},
            "Containers": {f"c{i}": {"EndpointID": ep, "IPv4Address": address, "IPv6Address": ""}
                           for i, (ep, address) in enumerate(endpoints.items())}}


def test_cut_ipam_allocations_are_released_after_the_grace_only(tmp_path):
    services = Services(netconfig.load(overrides={"state_dir": str(tmp_path / "state")}, environ={}))
    ipam = services.ipam
    assert isinstance(ipam, Ipam)
    kept = ipam.request_pool("local", "10.77.0.0/24", "", {}, False)["PoolID"]
    ipam.request_address(kept, "10.77.0.1", {"RequestAddressType": "com.docker.network.gateway"})
    ipam.request_address(kept, "10.77.0.9", {})  # an auxiliary address Docker asked for
    on_endpoint = ipam.request_address(kept, "", {})["Address"]  # 10.77.0.2/24
    cut_address = ipam.request_address(kept, "", {})["Address"]  # its reply never reached Docker
    ipam.request_pool("local", "10.77.0.0/24", "", {}, False)  # a second reference, reply cut: refs 2
    cut_pool = ipam.request_pool("local", "10.78.0.0/24", "", {}, False)["PoolID"]  # no network at all
    ranged = ipam.request_pool("local", "10.79.0.0/24", "10.79.0.128/25", {}, False)["PoolID"]
    in_range = ipam.request_address(ranged, "", {})["Address"]
    swarm = ipam.request_pool("local", "10.80.0.0/24", "", {}, False)["PoolID"]
    elsewhere = ipam.request_address(swarm, "", {})["Address"]  # a task's address on another node

    docker = {
        "n1": docker_network(_inspect("10.77.0.0/24", "10.77.0.1", {"e1": on_endpoint}, aux={"h": "10.77.0.9"})),
        "n2": docker_network(_inspect("10.79.0.0/24", "10.79.0.1", {}, ip_range="10.79.0.128/25")),
        "n3": docker_network(_inspect("10.80.0.0/24", "10.80.0.1", {}, scope="swarm")),
        "other": docker_network(_inspect("10.81.0.0/24", "10.81.0.1", {})),
    }
    clock = Clock()
    gc = DockerGC(services.driver, "unix:///nowhere", grace=120, clock=clock, ipam=ipam)
    assert gc.sweep(docker) == NOTHING  # marked only
    clock.now = 119
    assert gc.sweep(docker) == NOTHING
    clock.now = 120
    assert gc.sweep(docker) == dict(NOTHING, **{"pool references": 2, "addresses": 2})

    pools = {p["id"]: p["refs"] for p in ipam.pools()}
    assert cut_pool not in pools and pools[kept] == 1, "one reference per network of Docker's"
    assert ipam.allocated(kept) == ["10.77.0.1", on_endpoint.split("/")[0], "10.77.0.9"]
    assert cut_address.split("/")[0] not in ipam.allocated(kept)
    assert in_range.split("/")[0] not in ipam.allocated(ranged), "an address no endpoint has"
    assert ipam.allocated(swarm) == [elsewhere.split("/")[0]], "swarm scope: not all of it is listed here"
    clock.now = 1000
    assert gc.sweep(docker) == NOTHING

    # An address whose endpoint shows up within the grace (a container start in flight) stays.
    late = ipam.request_address(kept, "", {})["Address"]
    gc.sweep(docker)
    clock.now = 1100
    docker["n1"] = docker_network(_inspect("10.77.0.0/24", "10.77.0.1", {"e1": on_endpoint, "e2": late},
                                           aux={"h": "10.77.0.9"}))
    clock.now = 1300
    assert gc.sweep(docker) == NOTHING and late.split("/")[0] in ipam.allocated(kept)


def test_without_the_local_ipam_no_allocation_is_touched(tmp_path):
    """The shared (etcd) IPAM spans hosts: this host's Docker lists only its own part of a pool."""
    services = Services(netconfig.load(overrides={"state_dir": str(tmp_path / "state")}, environ={}))
    pool = services.ipam.request_pool("local", "10.78.0.0/24", "", {}, False)["PoolID"]
    clock = Clock()
    gc = DockerGC(services.driver, "unix:///nowhere", grace=0, clock=clock, ipam=None)
    gc.sweep({})
    clock.now = 10
    assert gc.sweep({}) == NOTHING and [p["id"] for p in services.ipam.pools()] == [pool]

"""The wire protocol through Flask's test client: every route answers, errors carry both keys, bodies
may be empty. Calls that would touch the kernel are covered in tests/kernel and tests/e2e."""
import json

import pytest

from netplugin import config as netconfig
from netplugin.service import create_app

CT = "application/vnd.docker.plugins.v1.2+json"
NETWORK_ROUTES = ["GetCapabilities", "CreateNetwork", "DeleteNetwork", "AllocateNetwork", "FreeNetwork",
                  "CreateEndpoint", "DeleteEndpoint", "EndpointOperInfo", "Join", "Leave", "DiscoverNew",
                  "DiscoverDelete", "ProgramExternalConnectivity", "RevokeExternalConnectivity"]
IPAM_ROUTES = ["GetCapabilities", "GetDefaultAddressSpaces", "RequestPool", "ReleasePool",
               "RequestAddress", "ReleaseAddress"]


@pytest.fixture
def client(tmp_path):
    app = create_app(netconfig.load(overrides={"state_dir": str(tmp_path)}))
    return app.test_client()


def post(client, route, body=None, raw=None):
    # Docker sends no Content-Type header.
    response = client.post(route, data=raw if raw is not None else ("" if body is None else json.dumps(body)))
    assert response.content_type == CT
    return response.status_code, json.loads(response.data)


def test_activate_with_empty_body(client):
    assert post(client, "/Plugin.Activate") == (200, {"Implements": ["NetworkDriver", "IpamDriver"]})


def test_capabilities(client):
    assert post(client, "/NetworkDriver.GetCapabilities") == (200, {"Scope": "local",
                                                                    "ConnectivityScope": "local"})
    assert post(client, "/IpamDriver.GetCapabilities")[1] == {"RequiresMACAddress": False,
                                                             "RequiresRequestReplay": False}
    assert post(client, "/IpamDriver.GetDefaultAddressSpaces")[1] == {
        "LocalDefaultAddressSpace": "local", "GlobalDefaultAddressSpace": "global"}


@pytest.mark.parametrize("route", [f"/NetworkDriver.{r}" for r in NETWORK_ROUTES]
                         + [f"/IpamDriver.{r}" for r in IPAM_ROUTES])
def test_every_route_exists_and_tolerates_empty_bodies(client, route):
    for raw in ("", "not json", "[1, 2]", "null"):
        status, body = post(client, route, raw=raw)
        assert status != 404, route
        if "Err" in body:
            assert body["Err"] and body["Err"] == body["Error"], "both error keys, never empty"


def test_unknown_route_is_404_in_docker_format(client):
    status, body = post(client, "/NetworkDriver.NoSuchThing", {})
    assert status == 404 and body["Err"] == body["Error"] != ""


def test_unknown_ids_are_released_without_error(client):
    nid, eid = "ab" * 32, "cd" * 32
    assert post(client, "/NetworkDriver.DeleteNetwork", {"NetworkID": nid}) == (200, {})
    assert post(client, "/NetworkDriver.Leave", {"NetworkID": nid, "EndpointID": eid}) == (200, {})
    assert post(client, "/NetworkDriver.DeleteEndpoint", {"NetworkID": nid, "EndpointID": eid}) == (200, {})
    assert post(client, "/IpamDriver.ReleasePool", {"PoolID": "local/10.9.0.0/24"}) == (200, {})
    assert post(client, "/IpamDriver.ReleaseAddress", {"PoolID": "local/10.9.0.0/24",
                                                       "Address": "10.9.0.7"}) == (200, {})
    assert post(client, "/NetworkDriver.EndpointOperInfo", {"NetworkID": nid, "EndpointID": eid}) == (
        200, {"Value": {}})


def test_endpoint_on_unknown_network_is_a_clear_error(client):
    status, body = post(client, "/NetworkDriver.CreateEndpoint",
                        {"NetworkID": "ab" * 32, "EndpointID": "cd" * 32, "Interface": {}})
    assert status == 404 and "not known to this plugin" in body["Err"]


def test_wrong_types_are_refused(client):
    status, body = post(client, "/NetworkDriver.CreateNetwork", {"NetworkID": 5})
    assert status == 400 and "NetworkID must be a string" in body["Err"]
    status, body = post(client, "/NetworkDriver.CreateNetwork", {"NetworkID": "../../etc"})
    assert status == 400 and "not a valid ID" in body["Err"]
    status, body = post(client, "/IpamDriver.RequestPool", {"Pool": "10.0.0.0/8", "Options": "x"})
    assert status == 400 and "Options must be an object" in body["Err"]


def test_ipam_flow_as_docker_drives_it(client):
    _, pool = post(client, "/IpamDriver.RequestPool",
                   {"AddressSpace": "local", "Pool": "10.77.0.0/24", "SubPool": "", "Options": {}, "V6": False})
    assert pool["Pool"] == "10.77.0.0/24"
    gw = {"PoolID": pool["PoolID"], "Address": "10.77.0.1",
          "Options": {"RequestAddressType": "com.docker.network.gateway"}}
    assert post(client, "/IpamDriver.RequestAddress", gw)[1]["Address"] == "10.77.0.1/24"
    ask = {"PoolID": pool["PoolID"], "Address": "10.77.0.10", "Options": None}
    assert post(client, "/IpamDriver.RequestAddress", ask)[1]["Address"] == "10.77.0.10/24"
    status, body = post(client, "/IpamDriver.RequestAddress", ask)
    assert status == 409 and "already in use" in body["Err"] and body["Error"] == body["Err"]
    status, body = post(client, "/IpamDriver.RequestAddress", dict(ask, Address="10.78.0.1"))
    assert status == 400 and "10.78.0.1" in body["Err"]
    auto = post(client, "/IpamDriver.RequestAddress", {"PoolID": pool["PoolID"]})[1]["Address"]
    assert auto == "10.77.0.2/24"
    post(client, "/IpamDriver.ReleaseAddress", {"PoolID": pool["PoolID"], "Address": "10.77.0.10"})
    assert post(client, "/IpamDriver.RequestAddress", ask)[0] == 200


def test_default_pool_is_carved_from_supernet(client):
    _, first = post(client, "/IpamDriver.RequestPool", {"AddressSpace": "local"})
    _, second = post(client, "/IpamDriver.RequestPool", {"AddressSpace": "local"})
    assert (first["Pool"], second["Pool"]) == ("10.200.0.0/24", "10.200.1.0/24")


def test_request_pool_without_a_body_is_refused(client):
    # dockerd re-sends a request whose connection broke with an empty body (moby#39331): a default pool
    # carved for it became the network of the --subnet Docker had asked for
    for raw in ("", "{}", "null"):
        status, reply = post(client, "/IpamDriver.RequestPool", raw=raw)
        assert status == 400 and "without a body" in reply["Err"], raw
    assert post(client, "/IpamDriver.RequestPool", {"AddressSpace": "local"})[0] == 200


def test_allocate_network_returns_the_users_options(client):
    # Swarm passes AllocateNetwork's reply, not the request, to CreateNetwork on every node.
    options = {"mode": "static", "parent": "eth1", "egress": "80mbit", "com.docker.network.driver.mtu": "1400"}
    status, body = post(client, "/NetworkDriver.AllocateNetwork",
                        {"NetworkID": "sw" * 12 + "x", "Options": options, "IPv4Data": [], "IPv6Data": []})
    assert (status, body) == (200, {"Options": options})
    assert post(client, "/NetworkDriver.FreeNetwork", {"NetworkID": "sw" * 12 + "x"}) == (200, {})


@pytest.mark.parametrize("options, message", [
    ({"mode": "nosuch"}, "unknown mode 'nosuch'"),
    ({"parent": "eth1", "colour": "red"}, "unknown network option colour"),
    ({"parent": "eth1", "egress": "fast"}, "egress"),
])
def test_allocate_network_refuses_bad_options_on_the_manager(client, options, message):
    status, body = post(client, "/NetworkDriver.AllocateNetwork", {"NetworkID": "ab" * 32, "Options": options})
    assert status == 400 and message in body["Err"], body

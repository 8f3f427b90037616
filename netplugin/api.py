"""HTTP routes of the libnetwork remote network driver and remote IPAM driver.

Handlers only parse, call and serialise; see ../shared/reference/docker-network-plugin-protocol.md.
"""
from flask import Blueprint, current_app

from plugincore.app import reply, request_body
from plugincore.errors import InvalidRequest
from plugincore.fields import flag, mapping, sequence, text

bp = Blueprint("netplugin", __name__)
EMPTY = {}


def _driver():
    return current_app.extensions["netplugin.driver"]


def _ipam():
    return current_app.extensions["netplugin.ipam"]


@bp.post("/NetworkDriver.GetCapabilities")
def get_capabilities():
    return reply(_driver().capabilities())


@bp.post("/NetworkDriver.CreateNetwork")
def create_network():
    body = request_body()
    _driver().create_network(text(body, "NetworkID", True), mapping(body, "Options"),
                             sequence(body, "IPv4Data"), sequence(body, "IPv6Data"))
    return reply(EMPTY)


@bp.post("/NetworkDriver.DeleteNetwork")
def delete_network():
    _driver().delete_network(text(request_body(), "NetworkID", True))
    return reply(EMPTY)


@bp.post("/NetworkDriver.AllocateNetwork")
def allocate_network():
    # Only swarm managers call this, for global-scope drivers (cluster.scope).
    body = request_body()
    return reply(_driver().allocate_network(text(body, "NetworkID", True), mapping(body, "Options"),
                                            sequence(body, "IPv4Data"), sequence(body, "IPv6Data")))


@bp.post("/NetworkDriver.FreeNetwork")
def free_network():
    _driver().free_network(text(request_body(), "NetworkID", True))
    return reply(EMPTY)


@bp.post("/NetworkDriver.CreateEndpoint")
def create_endpoint():
    body = request_body()
    return reply(_driver().create_endpoint(text(body, "NetworkID", True), text(body, "EndpointID", True),
                                           mapping(body, "Interface"), mapping(body, "Options")))


@bp.post("/NetworkDriver.DeleteEndpoint")
def delete_endpoint():
    body = request_body()
    _driver().delete_endpoint(text(body, "NetworkID", True), text(body, "EndpointID", True))
    return reply(EMPTY)


@bp.post("/NetworkDriver.EndpointOperInfo")
def endpoint_oper_info():
    body = request_body()
    return reply({"Value": _driver().oper_info(text(body, "NetworkID"), text(body, "EndpointID"))})


@bp.post("/NetworkDriver.Join")
def join():
    body = request_body()
    return reply(_driver().join(text(body, "NetworkID", True), text(body, "EndpointID", True),
                                text(body, "SandboxKey")))


@bp.post("/NetworkDriver.Leave")
def leave():
    body = request_body()
    _driver().leave(text(body, "NetworkID", True), text(body, "EndpointID", True))
    return reply(EMPTY)


@bp.post("/NetworkDriver.DiscoverNew")
@bp.post("/NetworkDriver.DiscoverDelete")
def discover():
    # Node discovery events matter only to multi-host modes; a local driver acknowledges them.
    return reply(EMPTY)


@bp.post("/NetworkDriver.ProgramExternalConnectivity")
@bp.post("/NetworkDriver.RevokeExternalConnectivity")
def external_connectivity():
    # No NAT and no port mapping by design: containers own routable addresses.
    return reply(EMPTY)


@bp.post("/NetPlugin.Shape")
def shape():
    # Not a Docker endpoint: the admin interface (`netplugin shape`), on the same root-only socket.
    body = request_body()
    return reply(_driver().shape(text(body, "Endpoint", True), text(body, "Egress"), text(body, "Ingress"),
                                 flag(body, "Clear")))


@bp.post("/IpamDriver.GetCapabilities")
def ipam_capabilities():
    return reply(_ipam().capabilities())


@bp.post("/IpamDriver.GetDefaultAddressSpaces")
def default_address_spaces():
    return reply(_ipam().default_address_spaces())


@bp.post("/IpamDriver.RequestPool")
def request_pool():
    body = request_body()
    if not body:
        # dockerd re-sends a request whose connection broke (the plugin was killed) without its body
        # (moby#39331). Every field is optional here, and a default pool carved for that empty request was
        # taken by Docker as the pool of the --subnet it had asked for: refuse it, the operation then fails.
        raise InvalidRequest("RequestPool without a body (a request dockerd re-sent after a broken connection)")
    return reply(_ipam().request_pool(text(body, "AddressSpace"), text(body, "Pool"), text(body, "SubPool"),
                                      mapping(body, "Options"), flag(body, "V6")))


@bp.post("/IpamDriver.ReleasePool")
def release_pool():
    _ipam().release_pool(text(request_body(), "PoolID", True))
    return reply(EMPTY)


@bp.post("/IpamDriver.RequestAddress")
def request_address():
    body = request_body()
    return reply(_ipam().request_address(text(body, "PoolID", True), text(body, "Address"),
                                         mapping(body, "Options")))


@bp.post("/IpamDriver.ReleaseAddress")
def release_address():
    body = request_body()
    _ipam().release_address(text(body, "PoolID", True), text(body, "Address", True))
    return reply(EMPTY)

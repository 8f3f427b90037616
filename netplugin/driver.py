"""Network and endpoint lifecycle (the libnetwork remote driver), independent of HTTP.

Every operation on a network holds that network's cross-process lock; every multi-step kernel change is
undone on failure; Delete/Leave of an unknown ID succeeds (the plugin may have restarted, libnetwork#813).
"""
import logging
import re

from pyroute2 import IPRoute

from plugincore.errors import Conflict, InvalidRequest, NotFound
from .kernel import firewall, names
from .modes.base import check_known_options
from .shaping import parse_rates
from .state import CREATING, DELETING, READY, Endpoint, Network

log = logging.getLogger("netplugin.driver")
_ID = re.compile(r"^[A-Za-z0-9]{1,128}$")
GENERIC = "com.docker.network.generic"
INTERNAL = "com.docker.network.internal"


def check_id(value, what: str) -> str:
    if not isinstance(value, str) or not _ID.match(value):
        raise InvalidRequest(f"{what}: {value!r} is not a valid ID")
    return value


class NetworkDriver:
    def __init__(self, state, locks, modes, shaper, scope: str = "local"):
        self.state = state
        self.locks = locks
        self.modes = modes  # a ModeRegistry: the mode code for each network
        self.shaper = shaper  # per-endpoint rate limits (netplugin.shaping)
        self.scope = scope

    def capabilities(self) -> dict:
        return {"Scope": self.scope, "ConnectivityScope": self.scope}

    def _lock(self, network_id: str):
        return self.locks.hold("net-" + network_id[:32])

    def network_lock(self, network_id: str):
        """The lock every operation on the network holds (cross-process), for background work that
        must not interleave with a Join or Leave."""
        return self._lock(check_id(network_id, "NetworkID"))

    # networks
    def create_network(self, network_id: str, options: dict, ipv4: list, ipv6: list) -> None:
        check_id(network_id, "NetworkID")
        generic = options.get(GENERIC) or {}
        if not isinstance(generic, dict):
            raise InvalidRequest(f"{GENERIC} must be an object")
        generic = {str(k): v if isinstance(v, str) else str(v) for k, v in generic.items()}
        mode = self.modes.get(generic.get("mode"))
        with self._lock(network_id), IPRoute() as ipr:
            existing = self.state.get_network(network_id)
            if existing is not None and existing.status == READY:
                return  # a repeated CreateNetwork (idempotent)
            if existing is not None:  # an earlier attempt died half-way: start over cleanly
                self.state.set_network_status(network_id, DELETING)
                self._teardown(ipr, existing)
            verdict = mode.validate(ipr, network_id, generic, ipv4 or [], ipv6 or [],
                                    bool(options.get(INTERNAL)))
            verdict.options.update(parse_rates(generic, "network option"))
            net = Network(id=network_id, mode=mode.name, options=verdict.options, ipv4=ipv4 or [],
                          ipv6=ipv6 or [], parent=verdict.parent, status=CREATING, kernel=verdict.kernel)
            self.state.claim_network(net)  # before any kernel change: the crash-recovery record
            try:
                net.kernel = mode.ensure_network(ipr, net)
                net.status = READY
                self.state.set_network_status(network_id, READY, net.kernel)
                self.sync_firewall()
            except BaseException:
                log.warning("creating network %s failed; rolling back", network_id[:12])
                self._undo(ipr, net)
                raise
        log.info("network %s created (%s on %s)", network_id[:12], mode.name, net.parent)

    def allocate_network(self, network_id: str, options: dict, ipv4: list, ipv6: list) -> dict:
        """Swarm managers of a global-scope driver: allocate cluster-wide resources once per network."""
        check_id(network_id, "NetworkID")
        options = options or {}
        if isinstance(options.get(GENERIC), dict):  # the -o map may come nested, as in CreateNetwork
            options = options[GENERIC]
        given = {str(k): v if isinstance(v, str) else str(v) for k, v in options.items()}
        generic = {k: v for k, v in given.items() if not k.startswith("com.docker.")}
        mode = self.modes.get(generic.get("mode"))
        # Host-independent checks only: the parent NIC may exist on the workers, not on this manager.
        check_known_options(generic, mode.network_options, "network")
        parse_rates(generic, "network option")
        # Swarm hands the returned map, not the user's, to CreateNetwork on every node (as the
        # network's DriverState): keep the user's options and add what was allocated.
        return {"Options": {**given, **mode.allocate(network_id, generic, ipv4 or [])}}

    def free_network(self, network_id: str) -> None:
        check_id(network_id, "NetworkID")
        for mode in self.modes:
            mode.free(network_id)

    def delete_network(self, network_id: str) -> None:
        check_id(network_id, "NetworkID")
        with self._lock(network_id), IPRoute() as ipr:
            net = self.state.get_network(network_id)
            if net is None:
                log.warning("DeleteNetwork of unknown network %s: nothing to do", network_id[:12])
                return
            self.state.set_network_status(network_id, DELETING)
            self._teardown(ipr, net)
        log.info("network %s deleted", network_id[:12])

    def _teardown(self, ipr, net: Network) -> None:
        """Remove everything of ``net`` (also a half-created one), then forget it. If a step fails the
        row stays (status deleting) and start-up reconciliation retries, so nothing is orphaned."""
        mode = self.modes.get(net.mode)
        for ep in self.state.endpoints(net.id):
            self.shaper.remove(ipr, ep)
            mode.remove_endpoint(ipr, net, ep)
        self.shaper.network_removed(ipr, mode.shaping_device(net))
        mode.remove_network(ipr, net)
        self.state.drop_network(net.id)
        self.sync_firewall()

    def _undo(self, ipr, net: Network) -> None:
        """Roll back a failed create; an undo failure is logged, never raised over the real error."""
        try:
            self.state.set_network_status(net.id, DELETING)
            self._teardown(ipr, net)
        except Exception:  # noqa: BLE001
            log.exception("rollback of network %s incomplete; retried at start-up", net.id[:12])

    def sync_firewall(self) -> None:
        with self.locks.hold("firewall"):
            bridges = [b for net in self.state.networks() if net.status != DELETING
                       for b in self.modes.get(net.mode).bridges(net)]
            firewall.sync_forward_rules(bridges)

    # endpoints
    def _network(self, network_id: str) -> Network:
        net = self.state.get_network(check_id(network_id, "NetworkID"))
        if net is None or net.status != READY:
            raise NotFound(f"network {network_id[:12]} is not known to this plugin")
        return net

    def create_endpoint(self, network_id: str, endpoint_id: str, interface: dict, options: dict) -> dict:
        check_id(endpoint_id, "EndpointID")
        with self._lock(network_id):
            net = self._network(network_id)
            mode = self.modes.get(net.mode)
            check_known_options(options, mode.endpoint_options, "endpoint")
            address = interface.get("Address") or ""
            address6 = interface.get("AddressIPv6") or ""
            mac = interface.get("MacAddress") or ""
            user_options = {k: v for k, v in options.items() if not k.startswith("com.docker.")}
            parse_rates(user_options, "endpoint option")
            wanted = mode.endpoint_mac(net, user_options, mac)  # also checks the --driver-opt values
            reply = {}
            if not mac:  # fill only what Docker left empty, else Docker rolls the endpoint back
                mac = reply["MacAddress"] = wanted or names.mac_for(address)
            existing = self.state.get_endpoint(endpoint_id)
            if existing is not None:  # a repeated request: the same answer; anything else: refused
                same = (existing.network_id, existing.address, existing.address6, existing.options) == (
                    network_id, address, address6, user_options)
                if same and existing.mac == mac:
                    return {"Interface": reply}
                raise Conflict(f"endpoint {endpoint_id[:12]} already exists with other settings "
                               f"(network {existing.network_id[:12]}, address {existing.address or 'none'})")
            self.state.put_endpoint(Endpoint(id=endpoint_id, network_id=network_id, address=address,
                                             address6=address6, mac=mac, options=user_options))
        return {"Interface": reply}

    def delete_endpoint(self, network_id: str, endpoint_id: str) -> None:
        check_id(endpoint_id, "EndpointID")
        with self._lock(check_id(network_id, "NetworkID")), IPRoute() as ipr:
            ep, net = self.state.get_endpoint(endpoint_id), self.state.get_network(network_id)
            if ep is None:
                log.warning("DeleteEndpoint of unknown endpoint %s: nothing to do", endpoint_id[:12])
                return
            # The record goes first: if the plugin dies after it, start-up reconciliation removes the
            # links, class and rates nothing refers to. The other way round (found by the torture test),
            # a kill in between left a record whose kernel half was gone, which Docker never deletes again.
            self.state.drop_endpoint(endpoint_id)
            self._remove_endpoint_kernel(ipr, net, ep)
            self.shaper.forget(endpoint_id)

    def join(self, network_id: str, endpoint_id: str, sandbox_key: str) -> dict:
        check_id(endpoint_id, "EndpointID")
        with self._lock(network_id), IPRoute() as ipr:
            net = self._network(network_id)
            ep = self.state.get_endpoint(endpoint_id)
            if ep is None or ep.network_id != network_id:
                raise NotFound(f"endpoint {endpoint_id[:12]} is not known to this plugin")
            mode = self.modes.get(net.mode)
            kernel, reply = mode.ensure_endpoint(ipr, net, ep)
            try:
                self.state.set_endpoint_join(endpoint_id, sandbox_key or "joined", kernel)
                ep.kernel = kernel
                self.shaper.apply(ipr, net, ep, mode)
            except BaseException:
                self.shaper.remove(ipr, ep)
                mode.remove_endpoint(ipr, net, ep)
                self.state.set_endpoint_join(endpoint_id, "", {})
                raise
        return reply

    def leave(self, network_id: str, endpoint_id: str) -> None:
        check_id(endpoint_id, "EndpointID")
        with self._lock(check_id(network_id, "NetworkID")), IPRoute() as ipr:
            ep, net = self.state.get_endpoint(endpoint_id), self.state.get_network(network_id)
            if ep is None or net is None:
                log.warning("Leave of unknown endpoint %s: nothing to do", endpoint_id[:12])
                return
            self.state.set_endpoint_join(endpoint_id, "", {})  # first, as in delete_endpoint
            self._remove_endpoint_kernel(ipr, net, ep)

    def _remove_endpoint_kernel(self, ipr, net, ep) -> None:
        """The kernel half of an endpoint whose record already says it is gone: a failure here is
        logged, not raised (Docker cannot undo a Leave or DeleteEndpoint), and start-up reconciliation
        removes what is left."""
        try:
            self.shaper.remove(ipr, ep)
            if net is not None:
                self.modes.get(net.mode).remove_endpoint(ipr, net, ep)
        except Exception:  # noqa: BLE001
            log.exception("endpoint %s: kernel leftovers stay until the next start", ep.id[:12])

    def shape(self, endpoint: str, egress: str | None, ingress: str | None, clear: bool = False) -> dict:
        """A live rate change (the admin source): set the given directions, or clear the admin
        override; applied at once if the endpoint is joined. Returns the endpoint's rates."""
        ep = self.state.find_endpoint(endpoint)
        changes: dict[str, int | None] = {d: None for d in ("egress", "ingress")} if clear else {}
        for direction, value in (("egress", egress), ("ingress", ingress)):
            if value not in (None, ""):
                changes[direction] = parse_rates({direction: value}, "rate")[direction]
        if not changes:
            raise InvalidRequest("give an egress and/or ingress rate (like 50mbit), or clear")
        return self.set_rates(ep.id, "admin", changes)

    def set_rates(self, endpoint_id: str, source: str, changes: dict[str, int | None]) -> dict:
        """Store ``source``'s rates (None clears one) and apply the endpoint's effective rates if it
        is joined; on a kernel failure the previous rates are restored and the error raised."""
        ep = self.state.get_endpoint(endpoint_id)
        if ep is None:
            raise NotFound(f"endpoint {endpoint_id[:12]} is not known to this plugin")
        with self._lock(ep.network_id), IPRoute() as ipr:
            net = self._network(ep.network_id)
            ep = self.state.get_endpoint(endpoint_id)
            if ep is None:
                raise NotFound(f"endpoint {endpoint_id[:12]} is gone")
            mode = self.modes.get(net.mode)
            before = self.shaper.stored(ep.id).get(source, {})
            self.shaper.set_rates(ep.id, source, changes)
            try:
                if ep.sandbox:
                    self.shaper.apply(ipr, net, ep, mode)
            except BaseException:
                self.shaper.set_rates(ep.id, source, {d: before.get(d) for d in changes})
                if ep.sandbox:
                    self.shaper.apply(ipr, net, ep, mode)
                raise
            return {"Endpoint": ep.id, "Network": net.id, **self.shaper.report(net, ep)}

    def oper_info(self, network_id: str, endpoint_id: str) -> dict:
        ep, net = self.state.get_endpoint(endpoint_id), self.state.get_network(network_id)
        if ep is None or net is None:
            return {}
        return (self.modes.get(net.mode).oper_info(net, ep) | self.shaper.report(net, ep)
                | {"address": ep.address, "joined": bool(ep.sandbox)})

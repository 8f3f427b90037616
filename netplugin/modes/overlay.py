"""Overlay mode: an internal VXLAN network spanning hosts, with no way out.

Per network a VXLAN device (``npx-<id>``, learning off, over the underlay NIC, local address = this
host's VTEP) is the uplink of a bridge like static mode's. The VNI and the overlay's membership live
in the overlay registry (etcd when configured, so every host of the cluster agrees); each endpoint is
published there at Join with its MAC, IP and VTEP, and every host keeps the forwarding table of its
VXLAN devices equal to the other hosts' published endpoints (netplugin.overlay_agent), so traffic is
unicast VTEP to VTEP and broadcasts (ARP) are replicated to the hosts that have endpoints.

No gateway, no NAT, no docker_gwbridge (Join sets DisableGatewayService), and the bridge carries no
address: containers reach the overlay's other containers and nothing else, the host included.
"""
import ipaddress
import logging

from plugincore.errors import BackendError, InvalidRequest
from ..cluster.etcd import ClusterUnavailable
from ..cluster.overlays import SWARM, VNI_MAX, check_overlay_name
from ..kernel import links, names, vxlan
from .base import MTU_OPTION, Validated, check_known_options, parse_mtu
from ..shaping import RATE_OPTIONS
from .bridged import BridgedMode

log = logging.getLogger("netplugin.overlay")


def parse_vni(value) -> int | None:
    if value in (None, ""):
        return None
    text = str(value)
    if not text.isdigit() or not 1 <= int(text) <= VNI_MAX:
        raise InvalidRequest(f"vni {value!r} is not a VXLAN network identifier (1-{VNI_MAX})")
    return int(text)


class OverlayMode(BridgedMode):
    name = "overlay"
    network_options = {
        "mode": "overlay",
        "overlay": "the overlay's cluster-wide name: networks with the same name on several hosts are one "
                   "overlay (default: vni<N> with -o vni, else the Docker network ID, as swarm gives it)",
        "vni": "VXLAN network identifier, 1-16777215 (default: the overlay's, or the lowest free one)",
        "parent": "the underlay NIC VXLAN runs over (default: cluster.underlay, or the NIC holding "
                  "cluster.vtep_address)",
        MTU_OPTION: "MTU of the bridge and container interfaces (default: the underlay's minus 50)",
        **RATE_OPTIONS,
    }

    @property
    def overlays(self):
        if self.ctx.overlays is None:
            raise BackendError("overlay mode has no overlay registry (built without one)")
        return self.ctx.overlays

    # networks
    def validate(self, ipr, network_id, generic, ipv4, ipv6, internal) -> Validated:
        overlay, vni, subnet = self._identity(network_id, generic, ipv4)
        underlay, vtep = self._underlay(ipr, str(generic.get("parent") or ""))
        limit = underlay.mtu - vxlan.OVERHEAD
        mtu = parse_mtu(generic.get(MTU_OPTION)) or limit
        if mtu > limit:
            raise InvalidRequest(f"{MTU_OPTION}: {mtu} exceeds the underlay {underlay.name}'s MTU {underlay.mtu} "
                                 f"minus the VXLAN overhead of {vxlan.OVERHEAD}")
        return Validated(
            options={"overlay": overlay, "vni": vni, "parent": underlay.name, "vtep": vtep, "mtu": mtu,
                     "subnet": subnet, "internal": True},
            parent=None,  # the underlay carries many overlays: nothing is claimed exclusively
            kernel={"bridge": names.bridge_name(network_id), "uplink": names.vxlan_name(network_id),
                    "vni": None})

    def _identity(self, network_id: str, generic: dict, ipv4: list) -> tuple[str, int | None, str]:
        """(overlay name, requested VNI or None, IPv4 subnet) from the options, all checked."""
        check_known_options(generic, self.network_options, "network")
        vni = parse_vni(generic.get("vni"))
        overlay = check_overlay_name(str(generic.get("overlay") or (f"vni{vni}" if vni else network_id)))
        subnets = [d.get("Pool") for d in ipv4 if isinstance(d, dict) and d.get("Pool")]
        if len(subnets) != 1:
            raise InvalidRequest("overlay mode needs exactly one IPv4 subnet (--subnet)")
        return overlay, vni, subnets[0]

    def _underlay(self, ipr, parent: str) -> tuple[links.LinkInfo, str]:
        """The underlay NIC and this host's VTEP address on it."""
        cluster = self.ctx.cluster
        wanted_vtep = cluster.get("vtep_address", "")
        parent = parent or cluster.get("underlay", "")
        if parent:
            link = self.parent_link(ipr, parent)
            addresses = [a for a in links.global_addresses(ipr, link.index) if ":" not in a]
            if wanted_vtep and wanted_vtep not in [a.split("/")[0] for a in addresses]:
                raise InvalidRequest(f"cluster.vtep_address {wanted_vtep} is not an address of underlay {link.name}")
            if not addresses:
                raise InvalidRequest(f"underlay {link.name} has no IPv4 address to be the VTEP")
            return link, wanted_vtep or addresses[0].split("/")[0]
        if not wanted_vtep:
            raise InvalidRequest("overlay mode needs its underlay: -o parent=<nic>, or cluster.underlay or "
                                 "cluster.vtep_address in the configuration")
        for link in links.list_links(ipr):
            if wanted_vtep in [a.split("/")[0] for a in links.global_addresses(ipr, link.index)]:
                return link, wanted_vtep
        raise InvalidRequest(f"cluster.vtep_address {wanted_vtep} is not an address of this host")

    def ensure_network(self, ipr, net) -> dict:
        opts = net.options
        try:
            net.kernel["vni"] = self.overlays.attach(opts["overlay"], net.id, opts["vni"], opts["subnet"])
        except ClusterUnavailable:
            if net.kernel.get("vni") is None:
                raise
            log.warning("cluster store unreachable: repairing overlay %s with its recorded VNI %d",
                        opts["overlay"], net.kernel["vni"])
        kernel = super().ensure_network(ipr, net)
        try:
            self.sync_forwarding(ipr, net, self.overlays.endpoints(opts["overlay"]))
        except ClusterUnavailable:
            log.warning("cluster store unreachable: overlay %s forwarding table not refreshed", opts["overlay"])
        return kernel

    def _ensure_uplink(self, ipr, net) -> links.LinkInfo:
        return vxlan.ensure_vxlan(ipr, net.kernel["uplink"], vni=net.kernel["vni"], local=net.options["vtep"],
                                  dev=net.options["parent"], mtu=net.options["mtu"])

    def remove_network(self, ipr, net) -> None:
        if net.kernel.get("vni") is not None:  # attached: leave the overlay first (etcd down: nothing removed)
            self.overlays.detach(net.options["overlay"], net.id)
        super().remove_network(ipr, net)

    def _remove_uplink(self, ipr, net) -> None:
        vxlan.remove_vxlan(ipr, net.kernel["uplink"])

    def owned_links(self, net) -> list[str]:
        return [net.kernel["bridge"], net.kernel["uplink"]]

    def sync_forwarding(self, ipr, net, endpoints: list[dict]) -> dict:
        """Make the VXLAN device forward to the other hosts' endpoints exactly: their MACs to their
        VTEPs, and broadcasts to every VTEP that has one."""
        remote = [e for e in endpoints if e.get("vtep") and e["vtep"] != net.options["vtep"]]
        return vxlan.sync_fdb(ipr, net.kernel["uplink"], unicast={e["mac"]: e["vtep"] for e in remote},
                              flood={e["vtep"] for e in remote})

    # swarm
    def allocate(self, network_id, generic, ipv4) -> dict:
        """The manager fixes the overlay's name and VNI once; every node's CreateNetwork then joins
        that overlay (its own options carry them)."""
        overlay, vni, subnet = self._identity(network_id, generic, ipv4)
        vni = self.overlays.attach(overlay, network_id, vni, subnet, host=SWARM)
        return {"overlay": overlay, "vni": str(vni)}

    def free(self, network_id) -> None:
        self.overlays.detach_network(network_id, SWARM)

    # endpoints
    def ensure_endpoint(self, ipr, net, ep) -> tuple[dict, dict]:
        kernel, reply = super().ensure_endpoint(ipr, net, ep)
        try:
            self.publish(net, ep)
        except BaseException:
            super().remove_endpoint(ipr, net, ep)
            raise
        return kernel, reply

    def publish(self, net, ep) -> None:
        address = str(ipaddress.ip_interface(ep.address).ip) if ep.address else ""
        self.overlays.publish(net.options["overlay"], ep.id, ep.mac, address, net.options["vtep"], net.id)

    def remove_endpoint(self, ipr, net, ep) -> None:
        super().remove_endpoint(ipr, net, ep)
        try:
            self.overlays.withdraw(net.options["overlay"], ep.id)
        except ClusterUnavailable:
            # Leave must not fail: the overlay agent withdraws it when the store is back.
            log.warning("cluster store unreachable: endpoint %s stays published until it is back", ep.id[:12])

    def repair_endpoint(self, ipr, net, ep, existing: dict) -> bool:
        if not super().repair_endpoint(ipr, net, ep, existing):
            return False
        try:
            self.publish(net, ep)
        except ClusterUnavailable:
            log.warning("cluster store unreachable: endpoint %s republished later", ep.id[:12])
        return True

    def oper_info(self, net, ep) -> dict:
        return {**super().oper_info(net, ep), "overlay": net.options["overlay"], "vni": net.kernel.get("vni"),
                "vtep": net.options["vtep"]}

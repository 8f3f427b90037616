"""SR-IOV mode: each container gets a virtual function (VF) of a physical NIC (the PF) as its interface.

No bridge and no veth: the VF's netdev itself is handed to Docker through Join. Its MAC, port VLAN,
spoof check (on), trust (off) and max tx rate are set through the PF, so the container cannot change
them. A network's pool is the PF's first ``-o vfs`` VFs (enabled if the PF has none); which endpoint
holds which VF is the persisted inventory. Leave/DeleteEndpoint reset the VF and return it to the
pool; a VF whose netdev is still inside a container (Docker moves it home after Leave) is skipped by
later claims until it is back.
"""
import logging
import re

from plugincore.errors import BackendError, Conflict, InvalidRequest
from ..kernel import links, sriov
from ..sriov_inventory import Inventory
from ..state import READY
from .base import MTU_OPTION, Mode, Validated, check_known_options, parse_mtu
from .bridged import BridgedMode
from .vlan import parse_vlan

log = logging.getLogger("netplugin.sriov")
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_RATE = re.compile(r"^(\d+)\s*(mbit)?$", re.IGNORECASE)


def parse_mac(value) -> str:
    mac = str(value).strip().lower()
    if not _MAC.match(mac) or mac == sriov.ZERO_MAC or int(mac[:2], 16) & 1:
        raise InvalidRequest(f"mac {value!r} is not a unicast MAC address (like 02:11:22:33:44:55)")
    return mac


def parse_rate(value, limit: int | None = None) -> int:
    """Max tx rate in Mbit/s: ``100`` or ``100mbit``; empty = no limit (0)."""
    if value in (None, ""):
        return 0
    match = _RATE.match(str(value).strip())
    if not match:
        raise InvalidRequest(f"rate {value!r} is not a rate in Mbit/s (like 100 or 100mbit)")
    rate = int(match.group(1))
    if limit and rate > limit:
        raise InvalidRequest(f"rate {rate} Mbit/s exceeds the link speed of {limit} Mbit/s")
    return rate


class SriovMode(Mode):
    name = "sriov"
    network_options = {
        "mode": "sriov",
        "parent": "the SR-IOV physical function (PF) whose VFs the containers get (required)",
        "vlan": "802.1Q VLAN id, 1-4094, the PF tags and strips for every VF (default: untagged)",
        "vfs": "how many VFs the network may use (default: the enabled ones, or all the PF supports); "
               "enabled if the PF has none",
        MTU_OPTION: "MTU of the VF interfaces (default: the PF's)",
        "egress": "default max tx rate of each VF (tc units, whole Mbit/s: 100mbit, 1gbit)",
    }
    endpoint_options = {
        "mac": "the VF's MAC address (default: the endpoint's)",
        "rate": "max tx rate of the VF in Mbit/s (e.g. 100 or 100mbit; default: no limit)",
        "egress": "max tx rate of the VF (tc units, whole Mbit/s; same as rate)",
    }

    def __init__(self, ctx=None):
        super().__init__(ctx)
        self.inventory = Inventory(self.ctx.store) if self.ctx.store is not None else None

    def _inv(self) -> Inventory:
        if self.inventory is None:
            raise BackendError("sriov mode has no state store (built without one)")
        return self.inventory

    # networks
    def validate(self, ipr, network_id, generic, ipv4, ipv6, internal) -> Validated:
        check_known_options(generic, self.network_options, "network")
        pf = BridgedMode.parent_link(ipr, str(generic.get("parent") or ""))
        if sriov.sysfs_ifindex(pf.name) != pf.index:
            raise InvalidRequest(f"{sriov.SYSFS_NET}/{pf.name} is not this namespace's {pf.name}: "
                                 "the plugin must run in the host's network namespace")
        total = sriov.total_vfs(pf.name)
        if not total:
            raise InvalidRequest(f"parent {pf.name} is not an SR-IOV physical function "
                                 f"(no VFs in {sriov.SYSFS_NET}/{pf.name}/device/sriov_totalvfs)")
        enabled = sriov.num_vfs(pf.name)
        vfs = self._parse_vfs(generic.get("vfs"), pf.name, total, enabled)
        vlan = parse_vlan(generic["vlan"]) if generic.get("vlan") not in (None, "") else 0
        mtu = parse_mtu(generic.get(MTU_OPTION), pf.mtu, f"PF {pf.name}") or pf.mtu
        return Validated(options={"parent": pf.name, "vlan": vlan, "vfs": vfs, "mtu": mtu,
                                  "internal": bool(internal)},
                         parent=pf.name,  # the claim: one network per PF
                         kernel={"pf": pf.name, "vfs": vfs, "enabled_vfs": False, "pf_up": pf.up})

    @staticmethod
    def _parse_vfs(value, pf: str, total: int, enabled: int) -> int:
        if value in (None, ""):
            return enabled or total
        text = str(value)
        if not text.isdigit() or not 1 <= int(text) <= total:
            raise InvalidRequest(f"vfs {value!r} is not a VF count (1-{total} on PF {pf})")
        if enabled and int(text) > enabled:
            raise InvalidRequest(f"PF {pf} has {enabled} VFs enabled, fewer than vfs={text}; the count can "
                                 "only change from 0 (echo 0 > sriov_numvfs while no VF is in use)")
        return int(text)

    def ensure_network(self, ipr, net) -> dict:
        pf_name, count = net.kernel["pf"], net.kernel["vfs"]
        if links.get_link(ipr, pf_name) is None:
            raise BackendError(f"PF {pf_name} has disappeared")
        links.set_link(ipr, pf_name, up=True)  # VFs carry nothing while their PF is down
        enabled = sriov.num_vfs(pf_name)
        if enabled == 0:
            net.kernel["enabled_vfs"] = True  # in place: a rollback of a failed create sees it
            sriov.enable_vfs(pf_name, count)
        elif enabled < count:
            raise BackendError(f"PF {pf_name} has {enabled} VFs enabled, the network needs {count}")
        sriov.bind_vf_drivers(pf_name, range(count))
        inv = self._inv()
        recorded = {vf.vf: vf.netdev for vf in inv.pool(net.id)}
        inv.register(net.id, pf_name, {vf: (sriov.vf_pci(pf_name, vf),
                                            self._vf_name(ipr, pf_name, vf, recorded.get(vf, "")))
                                       for vf in range(count)})
        return net.kernel

    @staticmethod
    def _vf_name(ipr, pf: str, vf: int, recorded: str) -> str:
        """The name to give the VF's netdev back: the one recorded when the pool was registered, unless
        another link holds it now (then the VF's current name)."""
        current = sriov.vf_netdev(pf, vf) or ""
        holder = links.get_link(ipr, recorded) if recorded else None
        return recorded if recorded and (holder is None or holder.name == current) else current

    def remove_network(self, ipr, net) -> None:
        inv, pf_name = self._inv(), net.kernel["pf"]
        pf = links.get_link(ipr, pf_name)
        for vf in inv.pool(net.id):
            if vf.endpoint_id is not None:
                self._release(ipr, vf)
        if pf is not None and net.kernel.get("enabled_vfs") and sriov.num_vfs(pf_name):
            away = [n for n in range(sriov.num_vfs(pf_name)) if sriov.vf_location(pf_name, n) == sriov.AWAY]
            if away:  # disabling would rip them out of their containers
                log.warning("leaving the VFs of PF %s enabled: VFs %s are in use elsewhere", pf_name, away)
            else:
                sriov.disable_vfs(pf_name)
        inv.forget_network(net.id)
        if pf is not None and not net.kernel.get("pf_up", True):
            links.set_link(ipr, pf_name, up=False)  # give it back as it was

    # endpoints
    def endpoint_mac(self, net, options: dict, mac: str) -> str | None:
        parse_rate(options.get("rate"), sriov.link_speed(net.kernel["pf"]))
        if not options.get("mac"):
            return None
        wanted = parse_mac(options["mac"])
        if mac and mac.lower() != wanted:
            raise InvalidRequest(f"--driver-opt mac={wanted} differs from the endpoint's MAC address {mac}")
        return wanted

    def ensure_endpoint(self, ipr, net, ep) -> tuple[dict, dict]:
        pf = links.get_link(ipr, net.kernel["pf"])
        if pf is None:
            raise BackendError(f"PF {net.kernel['pf']} of network {net.id[:12]} has disappeared")
        mac = parse_mac(ep.options.get("mac") or ep.mac)
        rate = parse_rate(ep.options.get("rate"))
        held = self._inv().claimed_by(ep.id)
        if held is not None and sriov.vf_location(held.pf, held.vf) == sriov.AWAY:
            raise Conflict(f"endpoint {ep.id[:12]} is already joined: its VF {held.vf} of {held.pf} "
                           "is in use")
        vf = self._inv().claim(net.id, ep.id, usable=lambda v: sriov.vf_location(v.pf, v.vf) == sriov.HOME)
        try:
            netdev = sriov.vf_netdev(vf.pf, vf.vf)
            if netdev is None:
                raise Conflict(f"VF {vf.vf} of PF {vf.pf} has no netdev in this host's namespace")
            netdev = sriov.park_netdev(ipr, netdev, vf.netdev)
            sriov.configure_vf(ipr, pf, vf.vf, mac=mac, vlan=net.options.get("vlan", 0), max_tx_rate=rate)
            sriov.prepare_netdev(ipr, netdev, mtu=net.options["mtu"], mac=mac)
        except BaseException:
            self._release(ipr, vf)
            raise
        log.info("endpoint %s gets VF %d of %s (%s)", ep.id[:12], vf.vf, vf.pf, netdev)
        kernel = {"pf": vf.pf, "vf": vf.vf, "netdev": netdev, "mac": mac, "rate": rate}
        return kernel, BridgedMode._join_reply(net, netdev)  # noqa: SLF001 - the same reply as bridged modes

    def remove_endpoint(self, ipr, net, ep) -> None:
        vf = self._inv().claimed_by(ep.id)
        if vf is not None:
            self._release(ipr, vf)
        self._sweep(ipr, net)

    def _sweep(self, ipr, net) -> None:
        """Reset free VFs that came home carrying a container's settings again: a VF driver registers
        its own MAC with the PF when it resets (igbvf does while Docker moves it home after Leave, and
        the PF accepts it once the admin MAC is cleared). Runs at Leave/DeleteEndpoint; one netlink
        dump of the PF's VFs when there is nothing to do."""
        pf = links.get_link(ipr, net.kernel["pf"])
        if pf is None:
            return
        settings = sriov.vf_settings(ipr, pf.index)
        for vf in self._inv().pool(net.id):
            if (vf.endpoint_id is None and not sriov.is_neutral(settings.get(vf.vf, {}))
                    and sriov.vf_location(vf.pf, vf.vf) == sriov.HOME):
                for problem in sriov.reset_vf(ipr, pf, vf.vf):
                    log.warning("resetting free VF %d of %s: %s", vf.vf, vf.pf, problem)

    def _release(self, ipr, vf) -> None:
        """Reset the VF through its PF and return it to the pool. Its netdev may still be in the
        container (Docker's Leave comes before it moves the interface home): claims skip it until then."""
        pf = links.get_link(ipr, vf.pf)
        for problem in (sriov.reset_vf(ipr, pf, vf.vf) if pf is not None else []):
            log.warning("resetting VF %d of %s: %s", vf.vf, vf.pf, problem)
        netdev = sriov.vf_netdev(vf.pf, vf.vf)
        if netdev is not None:
            sriov.park_netdev(ipr, netdev, vf.netdev)
        self._inv().release(vf.endpoint_id)
        log.info("VF %d of %s reset and free", vf.vf, vf.pf)

    def repair_endpoint(self, ipr, net, ep, existing: dict) -> bool:
        vf = self._inv().claimed_by(ep.id)
        if vf is None or sriov.vf_location(vf.pf, vf.vf) != sriov.AWAY:
            return False  # its container is gone (the VF came home) or the VF itself is gone
        pf = links.get_link(ipr, vf.pf)
        if pf is None:
            return False
        # The PF keeps VF settings while its driver lives; after a PF reset they are applied again.
        sriov.configure_vf(ipr, pf, vf.vf, mac=ep.kernel.get("mac") or ep.mac,
                           vlan=net.options.get("vlan", 0), max_tx_rate=ep.kernel.get("rate", 0))
        return True

    def reconcile(self, ipr, state) -> dict:
        """After a restart: VFs claimed by endpoints that no longer exist (or are not joined) are reset
        and freed, unless their netdev is inside a container (kept: a later claim skips them until they
        come home); the pools of vanished networks are dropped."""
        freed = kept = 0
        inv = self._inv()
        vanished = set()
        for vf in inv.pool():
            net = state.get_network(vf.network_id)
            if net is None:
                vanished.add(vf.network_id)
            if vf.endpoint_id is None:
                continue
            ep = state.get_endpoint(vf.endpoint_id)
            if ep is not None and ep.sandbox and net is not None:
                continue
            if sriov.vf_location(vf.pf, vf.vf) == sriov.AWAY:
                log.warning("VF %d of %s: endpoint %s is gone but its netdev is in a container; kept",
                            vf.vf, vf.pf, vf.endpoint_id[:12])
                kept += 1
                continue
            self._release(ipr, vf)
            freed += 1
        for network_id in vanished:
            inv.forget_network(network_id)
        for net in state.networks():
            if net.mode == self.name and net.status == READY:
                self._sweep(ipr, net)
        return {"freed_vfs": freed, "kept_vfs": kept}

    def apply_egress(self, ipr, net, ep, rate: int) -> None:
        """The VF's hardware max tx rate (whole Mbit/s; the PF refuses more than its link speed)."""
        vf = self._inv().claimed_by(ep.id)
        pf = links.get_link(ipr, net.kernel["pf"])
        if vf is None or pf is None:
            return
        mbit = -(-rate // 1_000_000)  # round up: a limit never becomes "none"
        limit = sriov.link_speed(pf.name)
        if limit and mbit > limit:
            raise InvalidRequest(f"rate {mbit} Mbit/s exceeds the link speed of {limit} Mbit/s")
        sriov.configure_vf(ipr, pf, vf.vf, mac=ep.kernel.get("mac") or ep.mac, vlan=net.options.get("vlan", 0),
                           max_tx_rate=mbit)

    def oper_info(self, net, ep) -> dict:
        return {"mode": self.name, "pf": net.kernel["pf"], "vf": ep.kernel.get("vf"),
                "interface": ep.kernel.get("netdev", ""), "mac": ep.kernel.get("mac", ep.mac),
                "vlan": net.options.get("vlan", 0), "rate_mbit": ep.kernel.get("rate", 0)}

"""`netplugin status`: networks, endpoints, IPAM pools and the cluster, from the plugin's state, checked
against the kernel of this network namespace (links, bridge ports, HTB classes and TBF rates, the
FORWARD chain) and, when dockerd answers, named by Docker (network names, containers per endpoint).

What the state records but the kernel lacks (or the other way round) is listed as drift: start-up
reconciliation repairs most of it, so drift on a running plugin means something changed behind its
back. Read-only: nothing is repaired here.
"""
from __future__ import annotations

import ipaddress
import logging
import os
import sys

from pyroute2 import IPRoute

from plugincore.errors import PluginError
from plugincore.table import table
from .kernel import firewall, links, names
from .kernel import shaping as tc
from .state import READY

log = logging.getLogger("netplugin.status")
DOCKER_TIMEOUT = 2.0
BRIDGED = ("static", "vlan", "overlay")


def docker_view(docker_host: str | None, network_ids: list[str]) -> tuple[dict, str]:
    """({network ID: {"name", "containers": {endpoint ID: container name}}}, error text). Docker is
    optional here: without it the sandbox key stands in for the container."""
    if not docker_host or not network_ids:
        return {}, ""
    import docker

    if docker_host.startswith("unix://") and not os.path.exists(docker_host[len("unix://"):]):
        return {}, f"no dockerd socket at {docker_host[len('unix://'):]}"
    view = {}
    try:
        client = docker.DockerClient(base_url=docker_host, timeout=DOCKER_TIMEOUT)
    except Exception as exc:  # noqa: BLE001 - DockerException, requests' errors: Docker is optional
        return {}, f"dockerd at {docker_host} did not answer: {str(exc).splitlines()[0][:160]}"
    try:
        for net_id in network_ids:
            try:
                info = client.api.inspect_network(net_id)
            except docker.errors.NotFound:
                view[net_id] = {"name": None, "containers": {}}
                continue
            containers = {c.get("EndpointID"): c.get("Name") or cid[:12]
                          for cid, c in (info.get("Containers") or {}).items()}
            view[net_id] = {"name": info.get("Name"), "containers": containers}
    except Exception as exc:  # noqa: BLE001
        return view, f"dockerd at {docker_host}: {str(exc).splitlines()[0][:160]}"
    finally:
        client.close()
    return view, ""


def pool_size(pool: str) -> int:
    """Assignable addresses of a pool (an IPv4 network's first and last are not handed out)."""
    net = ipaddress.ip_network(pool, strict=False)
    return net.num_addresses - (2 if net.version == 4 and net.prefixlen < 31 else 0)


class Kernel:
    """One link dump, and qdisc/class reads cached per device."""

    def __init__(self, ipr):
        self.ipr = ipr
        self.links = {link.name: link for link in links.list_links(ipr)}
        self._classes: dict[str, dict] = {}

    def link(self, name: str | None):
        return self.links.get(name) if name else None

    def classes(self, device: str) -> dict[int, int]:
        if device not in self._classes:
            try:
                self._classes[device] = tc.classes(self.ipr, device)
            except PluginError:
                self._classes[device] = {}
        return self._classes[device]


def network_drift(kernel: Kernel, net) -> list[str]:
    if net.status != READY:
        return [f"status {net.status}: an operation was interrupted; finished or undone at the plugin's next start"]
    found = []
    if net.mode in BRIDGED:
        bridge, uplink = kernel.link(net.kernel.get("bridge")), kernel.link(net.kernel.get("uplink"))
        if bridge is None:
            found.append(f"bridge {net.kernel.get('bridge')} missing in kernel")
        if uplink is None:
            found.append(f"uplink {net.kernel.get('uplink')} missing in kernel")
        elif bridge is not None and uplink.master != bridge.index:
            found.append(f"uplink {uplink.name} is not a port of bridge {bridge.name}")
    elif net.mode == "sriov" and kernel.link(net.kernel.get("pf")) is None:
        found.append(f"PF {net.kernel.get('pf')} missing in kernel")
    return found


def endpoint_drift(kernel: Kernel, net, ep, rates: dict, shaped: dict) -> list[str]:
    """Links and rate limits of a joined bridged endpoint as the kernel has them."""
    if net is None or net.mode not in BRIDGED:
        return []
    host_if = names.host_veth_name(ep.id)
    host, bridge = kernel.link(host_if), kernel.link(net.kernel.get("bridge"))
    if not ep.sandbox:
        return [f"host veth {host_if} exists but the endpoint is not joined"] if host else []
    if host is None:
        return [f"host veth {host_if} missing in kernel"]
    found = []
    if bridge is not None and host.master != bridge.index:
        found.append(f"host veth {host_if} is not a port of bridge {bridge.name}")
    egress, ingress = rates.get("egress"), rates.get("ingress")
    if egress and ep.address:
        row = shaped.get(ep.id)
        have = kernel.classes(row[1]).get(row[0]) if row else None
        if have != egress[0]:
            where = f"class 1:{row[0]:x} on {row[1]}" if row else "no class recorded"
            found.append(f"egress {tc.format_rate(egress[0])}: kernel has "
                         f"{tc.format_rate(have) if have else 'nothing'} ({where})")
    try:
        have = tc.ingress_limit(kernel.ipr, host_if)
    except PluginError:
        have = None
    want = ingress[0] if ingress else None
    if have != want:
        found.append(f"ingress {tc.format_rate(want) if want else 'unlimited'}: kernel has "
                     f"{tc.format_rate(have) if have else 'no limit'} on {host_if}")
    return found


def _network_row(net, docker: dict, drift: list[str]) -> dict:
    subnets = [d.get("Pool") for d in net.ipv4 + net.ipv6 if d.get("Pool")]
    segment = net.options.get("vlan") or net.kernel.get("vni") or net.options.get("vni") or None
    return {"id": net.id, "name": (docker.get(net.id) or {}).get("name"), "mode": net.mode, "status": net.status,
            "parent": net.options.get("parent") or net.parent, "vlan": net.options.get("vlan"),
            "vni": net.kernel.get("vni") if net.mode == "overlay" else None, "segment": segment,
            "bridge": net.kernel.get("bridge"), "uplink": net.kernel.get("uplink") or net.kernel.get("pf"),
            "gateway": net.gateway, "subnets": subnets, "options": net.options, "kernel": net.kernel,
            "drift": drift}


def _endpoint_row(ep, net, docker: dict, report: dict, drift: list[str]) -> dict:
    containers = (docker.get(ep.network_id) or {}).get("containers") or {}
    interface = ep.kernel.get("host_if") or ep.kernel.get("netdev") or ""
    return {"id": ep.id, "network": ep.network_id, "container": containers.get(ep.id),
            "sandbox": ep.sandbox, "address": ep.address, "address6": ep.address6, "mac": ep.mac,
            "joined": bool(ep.sandbox), "interface": interface, "vf": ep.kernel.get("vf"),
            "links": ep.kernel, **report, "drift": drift}


def collect(services, docker_host: str | None = None) -> dict:
    driver = services.driver
    state, shaper = driver.state, driver.shaper
    networks = {n.id: n for n in state.networks()}
    docker, docker_error = docker_view(docker_host, list(networks))
    shaped = {r["endpoint_id"]: (r["minor"], r["device"])
              for r in services.store.read().execute("SELECT endpoint_id, minor, device FROM shape_classes")}
    report = {"networks": [], "endpoints": [], "pools": [], "drift": []}
    with IPRoute() as ipr:
        kernel = Kernel(ipr)
        for net in networks.values():
            drift = network_drift(kernel, net)
            report["networks"].append(_network_row(net, docker, drift))
            report["drift"] += [f"network {net.id[:12]}: {x}" for x in drift]
        keep = set()
        for ep in state.endpoints():
            net = networks.get(ep.network_id)
            rates = shaper.effective(net, ep) if net is not None else {}
            text = shaper.report(net, ep) if net is not None else {"egress": "", "ingress": ""}
            drift = endpoint_drift(kernel, net, ep, rates, shaped) if net is not None and net.status == READY \
                else ([] if net is not None else ["its network is not in the state"])
            report["endpoints"].append(_endpoint_row(ep, net, docker, text, drift))
            report["drift"] += [f"endpoint {ep.id[:12]}: {x}" for x in drift]
            keep.add(names.host_veth_name(ep.id))
            keep.add(names.peer_veth_name(ep.id))
        for net in networks.values():
            keep.update(driver.modes.get(net.mode).owned_links(net) if net.kernel else [])
        report["drift"] += [f"link {n} in kernel is in no state (removed at the plugin's next start)"
                            for n in sorted(kernel.links) if names.is_owned(n) and n not in keep]
    report["drift"] += firewall_drift(driver, networks.values())
    report["pools"], pools_error = _pools(services)
    report["cluster"] = _cluster(services, pools_error)
    report["docker"] = {"host": docker_host or "", "error": docker_error}
    return report


def firewall_drift(driver, networks) -> list[str]:
    wanted = sorted(b for net in networks if net.status == READY for b in driver.modes.get(net.mode).bridges(net))
    try:
        rules = firewall.forward_rules()
    except PluginError as exc:
        return [f"FORWARD chain not readable: {exc}"]
    have = sorted(r.split()[3] for r in rules if len(r.split()) > 3)
    if wanted == have:
        return []
    return [f"FORWARD chain {firewall.CHAIN} accepts {', '.join(have) or 'no bridge'}, state expects "
            f"{', '.join(wanted) or 'none'} (rebuilt at the plugin's next start)"]


def _pools(services) -> tuple[list[dict], str]:
    try:
        pools = services.ipam.pools()
    except PluginError as exc:  # the cluster store is down
        return [], str(exc)
    for p in pools:
        p["size"] = pool_size(p.get("sub_pool") or p["pool"])
    return pools, ""


def _cluster(services, error: str) -> dict:
    info = {"store": services.cluster["store"], "host_id": services.host_id, "scope": services.driver.scope,
            "live_hosts": {}, "error": error}
    if services.etcd is not None and not error:
        try:
            info["live_hosts"] = services.overlays.live_hosts()
        except PluginError as exc:
            info["error"] = str(exc)
    return info


def render(report: dict, out=sys.stdout) -> None:
    c = report["cluster"]
    line = f"cluster store {c['store']}, host {c['host_id']}, scope {c['scope']}"
    if c["store"] != "local":
        line += f", live hosts: {', '.join(sorted(c['live_hosts'])) or 'none'}"
    print(line + (f" (ERROR: {c['error']})" if c["error"] else ""), file=out)
    if report["docker"]["error"]:
        print(f"names from Docker: none ({report['docker']['error']})", file=out)
    print("\n" + table(
        ["NETWORK", "NAME", "MODE", "STATUS", "PARENT", "VLAN/VNI", "BRIDGE", "UPLINK", "GATEWAY", "SUBNET"],
        [[n["id"][:12], n["name"], n["mode"], n["status"], n["parent"], n["segment"], n["bridge"], n["uplink"],
          n["gateway"], ",".join(n["subnets"])] for n in report["networks"]]), file=out)
    print("\n" + table(
        ["ENDPOINT", "NETWORK", "CONTAINER", "ADDRESS", "MAC", "INTERFACE", "EGRESS", "INGRESS"],
        [[e["id"][:12], e["network"][:12], _container(e), e["address"] or e["address6"], e["mac"],
          e["interface"] + (f" (VF {e['vf']})" if e["vf"] is not None else ""), e["egress"], e["ingress"]]
         for e in report["endpoints"]]), file=out)
    print("\n" + table(["POOL", "IN USE / SIZE", "REFS"],
                       [[p.get("sub_pool") or p["pool"], f"{p['in_use']} / {p['size']}", p["refs"]]
                        for p in report["pools"]]), file=out)
    print(f"\nkernel (network namespace of this process, {_netns()}): "
          + ("as the state says" if not report["drift"] else "DRIFT"), file=out)
    for item in report["drift"]:
        print(f"  {item}", file=out)


def _container(e: dict) -> str:
    if not e["joined"]:
        return "(not joined)"
    if e["container"]:
        return e["container"]
    return f"sandbox {os.path.basename(e['sandbox'])}"


def _netns() -> str:
    try:
        return os.readlink("/proc/self/ns/net")
    except OSError:
        return "?"

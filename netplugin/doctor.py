"""`netplugin doctor`: is this host ready to run netplugin, and is it running? Each finding is OK, WARN or
FAIL with what is missing and how to fix it (plugincore.doctor); exit status 1 if anything failed.

Checks: root; kernel features tried for real in a throwaway network namespace (netplugin.kernel.probe:
veth, bridge, 802.1Q, VXLAN, HTB, TBF, the ipset + mangle classifier); br_netfilter in this namespace;
the iptables and ipset tools; the socket and a live plugin behind it; dockerd (docker_host) and the
networks it has on this driver; etcd when [cluster] store = "etcd"; the state directory; SR-IOV PFs of
existing networks. A feature no network uses yet is a WARN when missing (needed once a network asks
for it), a FAIL when a network in the state needs it.
"""
from __future__ import annotations

import json
import os
import socket
import sys

from plugincore import doctor as d
from plugincore.errors import PluginError
from plugincore.run import CommandError, run

PROBE_TIMEOUT = 6.0
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the probe imports this package
BRIDGE_NF = "/proc/sys/net/bridge/bridge-nf-call-iptables"
START = "start the plugin: netplugin serve [--config FILE] (or its service)"
# feature -> (what needs it, kernel module, kernel config option)
FEATURES = {
    "veth": ("every bridged mode (a veth pair per container)", "veth", "CONFIG_VETH"),
    "bridge": ("every bridged mode (a bridge per network)", "bridge", "CONFIG_BRIDGE"),
    "vlan": ("-o mode=vlan", "8021q", "CONFIG_VLAN_8021Q"),
    "vxlan": ("-o mode=overlay", "vxlan", "CONFIG_VXLAN"),
    "htb": ("egress rate limits", "sch_htb", "CONFIG_NET_SCH_HTB"),
    "tbf": ("ingress rate limits", "sch_tbf", "CONFIG_NET_SCH_TBF"),
    "classifier": ("egress rate limits (ipset hash:ip skbinfo + mangle SET --map-prio + br_netfilter)",
                   "ip_set_hash_ip xt_set br_netfilter",
                   "CONFIG_IP_SET_HASH_IP, CONFIG_NETFILTER_XT_SET, CONFIG_BRIDGE_NETFILTER"),
}


def kernel_fix(modules: str, options: str) -> str:
    """Load the module, or (a kernel without loadable modules) boot one built with the option."""
    if os.path.exists("/proc/modules"):
        first = modules.split()[0]
        return f"modprobe -a {modules} (to load at boot: echo {first} > /etc/modules-load.d/netplugin.conf)"
    return f"this kernel has no loadable modules: boot a kernel built with {options} (Debian's stock kernel is)"


class Usage:
    """What the plugin's state says is in use: modes, rate limits, SR-IOV PFs, network IDs."""

    def __init__(self, config: dict):
        self.modes: set[str] = set()
        self.shaping = False
        self.pfs: dict[str, str] = {}  # PF -> network ID
        self.network_ids: set[str] = set()
        self.error = ""
        path = os.path.join(config["state_dir"], "netplugin.db")
        if not os.path.exists(path):
            return
        try:
            self._read(path)
        except Exception as exc:  # noqa: BLE001 - an unreadable state is reported, not fatal here
            self.error = f"{path}: {exc}"

    def _read(self, path: str) -> None:
        import sqlite3

        db = sqlite3.connect(path, timeout=2)  # reads only (a read-only open fails on a WAL database at rest)
        try:
            for mode, options, kernel, net_id in db.execute("SELECT mode, options, kernel, id FROM networks"):
                options, kernel = json.loads(options), json.loads(kernel)
                self.modes.add(mode)
                self.network_ids.add(net_id)
                self.shaping |= bool(options.get("egress") or options.get("ingress"))
                if mode == "sriov" and kernel.get("pf"):
                    self.pfs[kernel["pf"]] = net_id
            for (options,) in db.execute("SELECT options FROM endpoints"):
                options = json.loads(options)
                self.shaping |= bool(options.get("egress") or options.get("ingress"))
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if "shape_rates" in tables:
                self.shaping |= db.execute("SELECT 1 FROM shape_rates LIMIT 1").fetchone() is not None
        finally:
            db.close()


def kernel_checks(usage: Usage) -> list[d.Check]:
    try:
        proc = run([sys.executable, "-m", "netplugin.kernel.probe"], timeout=PROBE_TIMEOUT, check=False,
                   env={"PYTHONPATH": os.pathsep.join(filter(None, [_ROOT, os.environ.get("PYTHONPATH")]))})
        found = json.loads(proc.stdout or "{}")
    except (CommandError, ValueError) as exc:
        return [d.fail("kernel features", f"the probe in a throwaway network namespace failed: {exc}",
                       "run netplugin doctor as root")]
    if not found:
        last = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        return [d.fail("kernel features", f"the probe in a throwaway network namespace failed: {last}",
                       "run netplugin doctor as root, with the same Python environment as the plugin")]
    if "error" in found:
        return [d.fail("kernel features", found["error"], "run netplugin doctor as root")]
    needed = {"veth": True, "bridge": True, "vlan": "vlan" in usage.modes, "vxlan": "overlay" in usage.modes,
              "htb": usage.shaping, "tbf": usage.shaping, "classifier": usage.shaping}
    checks = []
    for feature, (why, modules, options) in FEATURES.items():
        name = f"kernel: {feature}"
        error = found.get(feature, "not probed")
        if error is None:
            checks.append(d.ok(name, "works (tried in a throwaway network namespace)"))
            continue
        make = d.fail if needed[feature] else d.warn
        use = "networks in the state need it" if needed[feature] and feature not in ("veth", "bridge") \
            else f"needed for {why}"
        checks.append(make(name, f"{error}; {use}", kernel_fix(modules, options)))
    return checks


def bridge_netfilter_check(usage: Usage) -> d.Check:
    """br_netfilter in this (the plugin's) namespace: without it bridged frames skip iptables, so the
    shaping classifier never sees them."""
    name = "br_netfilter (bridged traffic through iptables)"
    make = d.fail if usage.shaping else d.warn
    try:
        with open(BRIDGE_NF) as f:
            value = f.read().strip()
    except FileNotFoundError:
        if os.path.exists("/proc/modules"):
            try:
                run(["modprobe", "-n", "br_netfilter"], timeout=d.PROBE_TIMEOUT)  # a dry run: loads nothing
                return d.ok(name, "not loaded yet: the plugin loads it at the first rate limit")
            except CommandError as exc:
                return make(name, f"cannot be loaded: {exc}", kernel_fix("br_netfilter", "CONFIG_BRIDGE_NETFILTER"))
        return make(name, f"{BRIDGE_NF} is missing and this kernel loads no modules; rate limits fail",
                    kernel_fix("br_netfilter", "CONFIG_BRIDGE_NETFILTER"))
    if value != "1":
        return make(name, f"net.bridge.bridge-nf-call-iptables = {value}: rate limits are refused",
                    "sysctl -w net.bridge.bridge-nf-call-iptables=1 (and in /etc/sysctl.d/ for boot)")
    return d.ok(name, "net.bridge.bridge-nf-call-iptables = 1")


def tool_checks(usage: Usage) -> list[d.Check]:
    return [d.tool_check("iptables", "iptables", "the FORWARD chain of bridged networks"),
            d.tool_check("iptables-restore", "iptables", "the FORWARD and mangle chains in one batch"),
            d.tool_check("ipset", "ipset", "egress rate limits (address -> class)", required=usage.shaping)]


def docker_checks(config: dict, docker_host: str, usage: Usage) -> list[d.Check]:
    check, client = d.docker_check(docker_host, "docker_host (or --docker-host)")
    if client is None:
        if config["labels"]:
            check.detail += "; rates from container labels wait for it"
        return [check]
    driver = os.path.basename(config["socket"]).removesuffix(".sock")
    try:
        networks = client.api.networks(filters={"driver": driver})
    except Exception as exc:  # noqa: BLE001
        return [check, d.warn(f"networks of driver {driver}", f"dockerd did not list them: {d.short(exc)}")]
    finally:
        client.close()
    unknown = sorted(n["Name"] for n in networks if n["Id"] not in usage.network_ids)
    checks = [check]
    if unknown and not usage.error:
        checks.append(d.warn(f"networks of driver {driver}", f"dockerd has {len(networks)}, the plugin's state "
                             f"misses {', '.join(unknown)} (state lost, or another state_dir?): their containers "
                             "cannot start", f"docker network rm {' '.join(unknown)}, then create them again"))
    else:
        checks.append(d.ok(f"networks of driver {driver}", f"dockerd has {len(networks)}, all known to the plugin"))
    return checks


def cluster_checks(config: dict) -> list[d.Check]:
    from .cluster.etcd import Etcd, parse_endpoints

    cluster = config["cluster"]
    if cluster["store"] != "etcd":
        return [d.ok("cluster store", f"{cluster['store']} (this host only)")]
    host_id = cluster["host_id"] or socket.gethostname()
    timeout = min(float(cluster["etcd_timeout"]), 3.0)
    try:
        endpoints = [f"{s}://{h}:{p}" for s, h, p in parse_endpoints(cluster["etcd_endpoints"])]
    except PluginError as exc:
        return [d.fail("cluster store etcd", str(exc), 'cluster.etcd_endpoints = "http://HOST:2379,..."')]

    live: set[str] = set()

    def one(url):
        def probe():
            try:
                hosts, revision = Etcd(url, cluster["etcd_prefix"], timeout).range("hosts/", keys_only=True)
            except PluginError as exc:
                return [d.warn(f"etcd {url}", str(exc), "start etcd there, or drop it from cluster.etcd_endpoints")]
            names = sorted(kv.key.split("/", 1)[1] for kv in hosts)
            live.update(names)
            return [d.ok(f"etcd {url}", f"answers (revision {revision}); live hosts: {', '.join(names) or 'none'}")]
        return url, probe

    checks = d.run_groups([one(url) for url in endpoints], timeout=timeout + 2)
    if not any(c.status == d.OK for c in checks):
        return checks + [d.fail("cluster store etcd", f"no endpoint answered within {timeout:g}s: requests fail "
                                "with 'cluster store unreachable'", "start etcd, or fix cluster.etcd_endpoints")]
    if host_id not in live:
        checks.append(d.warn(f"liveness record of {host_id}", "missing: this host's plugin is not running, or its "
                             "overlay agent cannot reach etcd (other hosts may reclaim its share)", START))
    return checks


def sriov_checks(usage: Usage) -> list[d.Check]:
    checks = []
    for pf, net_id in sorted(usage.pfs.items()):
        if os.path.exists(f"/sys/class/net/{pf}/device/sriov_totalvfs"):
            checks.append(d.ok(f"SR-IOV PF {pf}", f"present (network {net_id[:12]})"))
        else:
            checks.append(d.fail(f"SR-IOV PF {pf}", f"network {net_id[:12]} uses it, but this namespace's sysfs "
                                 "does not show it as an SR-IOV PF", "run the plugin (and doctor) in the host's "
                                 "network namespace; check the NIC and its driver"))
    return checks


def state_checks(config: dict, usage: Usage) -> list[d.Check]:
    checks = [d.state_dir_check(config["state_dir"], "state_dir (or --state-dir)")]
    if usage.error:
        checks.append(d.fail("state database", usage.error, "restore netplugin.db from a backup; the plugin "
                             "cannot know its networks without it"))
    return checks + sriov_checks(usage)


def checks(config: dict, docker_host: str | None = None) -> list[d.Check]:
    usage = Usage(config)
    groups = [
        ("running as root", lambda: [d.root_check("netplugin")]),
        ("kernel features", lambda: kernel_checks(usage) + [bridge_netfilter_check(usage)] + tool_checks(usage)),
        ("socket", lambda: d.socket_checks(config["socket"], ["NetworkDriver", "IpamDriver"], START)),
        ("dockerd", lambda: docker_checks(config, docker_host or config["docker_host"], usage)),
        ("cluster store", lambda: cluster_checks(config)),
        ("state", lambda: state_checks(config, usage)),
    ]
    return d.run_groups(groups, timeout=PROBE_TIMEOUT + 2)

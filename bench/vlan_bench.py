#!/usr/bin/env python3
"""VLAN-mode throughput benchmark: container-to-peer TCP (iperf3) over a netplugin VLAN network
versus over a plain veth pair, in one run (see bench/README.md). Needs 8021q, so it runs in the VM
lane:

    HOST_LOADAVG="$(cat /proc/loadavg)" bash scripts/vm-lane run --cwd /work/main -- \
        /work/main/.venv/bin/python bench/vlan_bench.py

Network namespaces (all created here, removed at the end, also on failure, Ctrl-C or SIGTERM):

    ctr (the "container")       hosta (the Docker host)                peer (across the trunk)
    eth0 10.78.0.10 --veth-- npe-.. -> npb-.. -> eth1.100 -> eth1 ==== eth1 -> eth1.100 10.78.0.50
    veth0 10.79.0.10 ------------------- plain veth pair ------------------- veth0 10.79.0.50

(a) VLAN: the network (mode=vlan, parent eth1, vlan 100) and the container's endpoint are made by
the plugin's driver in-process (CreateNetwork, CreateEndpoint, Join, as dockerd would call them),
and the endpoint's container end is moved into ctr as Docker would. (b) veth: ctr and peer joined
directly. One iperf3 server in peer; after one untimed warm-up run per path, ``iperf3 -c ... -t T
-O 1`` from ctr, alternating a b b a a b ...; medians, the ratio VLAN / veth, and the per-round
ratios. Exit 0 when measured, 1 when the bench failed, 2 when it cannot run here (no 8021q: not in
the VM lane).

    bench/vlan_bench.py [--rounds 5] [--seconds 5]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pyroute2 import IPRoute  # noqa: E402

from netplugin import config as netconfig  # noqa: E402
from netplugin.kernel import links  # noqa: E402
from netplugin.service import Services  # noqa: E402
from tests.lab import (LAB_PREFIX, NETNS_DIR, NSENTER, OWNER_PID, cleanup_all, skip_reason,  # noqa: E402
                       stop_popen, wait_until)
from tests.lab.netns import Lab, entered  # noqa: E402

IPERF3 = "/usr/bin/iperf3"
PORT = 5201
VLAN = 100
SUBNET = "10.78.0.0/24"
CTR_VLAN_IP, PEER_VLAN_IP = "10.78.0.10", "10.78.0.50"
CTR_VETH_IP, PEER_VETH_IP = "10.79.0.10", "10.79.0.50"
NET_ID, EP_ID = "b100" * 16, "be10" * 16


def log(msg: str) -> None:
    print(f"[{time.strftime('%T')}] {msg}", flush=True)


def _sigterm_as_interrupt(signum, frame):
    if os.getpid() != OWNER_PID:  # a forked pyroute2 helper: die as SIGTERM normally would
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        os._exit(128 + signum)
    raise KeyboardInterrupt(f"signal {signum}")


inside = entered  # the driver acts on the current netns


def cannot_run() -> str | None:
    reason = skip_reason()
    if reason:
        return reason
    if not os.access(IPERF3, os.X_OK):
        return f"{IPERF3} is missing (apt-get install iperf3)"
    if subprocess.run(["modprobe", "8021q"], capture_output=True).returncode != 0:
        return ("this kernel has no 8021q: run it in the VM lane: HOST_LOADAVG=\"$(cat /proc/loadavg)\" "
                f"bash scripts/vm-lane run --cwd {REPO} -- {REPO}/.venv/bin/python bench/vlan_bench.py")
    return None


# --- the two paths ---------------------------------------------------------------------------------

class Setup:
    def __init__(self, lab: Lab, workdir: Path):
        self.lab = lab
        self.hosta, self.peer, self.ctr = lab.netns("hosta"), lab.netns("peer"), lab.netns("ctr")
        self.driver = Services(netconfig.load(overrides={"state_dir": str(workdir / "state")},
                                              environ={})).driver
        self.network = self.endpoint = False

    def build(self) -> None:
        lab, hosta, peer, ctr = self.lab, self.hosta, self.peer, self.ctr
        for ns in (hosta, peer, ctr):  # v4 only, as on the tenants' networks: no IPv6 chatter
            lab.sh(ns, ["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1",
                        "net.ipv6.conf.default.disable_ipv6=1"])
        # The trunk, and the peer's side of VLAN 100.
        lab.veth(hosta, "eth1", peer, "eth1")
        with lab.ipr(peer) as ipr:
            ipr.link("add", ifname=f"eth1.{VLAN}", kind="vlan", link=ipr.link_lookup(ifname="eth1")[0],
                     vlan_id=VLAN)
        lab.addr(peer, f"eth1.{VLAN}", f"{PEER_VLAN_IP}/24")
        lab.up(peer, f"eth1.{VLAN}")
        # (a) the plugin's VLAN network and one joined endpoint, moved into ctr like Docker does.
        opts = {"com.docker.network.generic": {"mode": "vlan", "parent": "eth1", "vlan": str(VLAN)}}
        ipv4 = [{"AddressSpace": "local", "Pool": SUBNET, "Gateway": "10.78.0.1/24"}]
        with inside(hosta):
            self.driver.create_network(NET_ID, opts, ipv4, [])
            self.network = True
            self.driver.create_endpoint(NET_ID, EP_ID, {"Address": f"{CTR_VLAN_IP}/24"}, {})
            self.endpoint = True
            src = self.driver.join(NET_ID, EP_ID, "/bench")["InterfaceName"]["SrcName"]
            with IPRoute() as ipr:
                ipr.link("set", index=ipr.link_lookup(ifname=src)[0], net_ns_fd=ctr)
        with lab.ipr(ctr) as ipr:
            idx = ipr.link_lookup(ifname=src)[0]
            ipr.link("set", index=idx, ifname="eth0")
        lab.addr(ctr, "eth0", f"{CTR_VLAN_IP}/24")
        lab.up(ctr, "eth0")
        # (b) the plain veth pair between the same two namespaces.
        lab.veth(ctr, "veth0", peer, "veth0")
        lab.addr(ctr, "veth0", f"{CTR_VETH_IP}/24")
        lab.addr(peer, "veth0", f"{PEER_VETH_IP}/24")

    def describe(self) -> dict[str, str]:
        h, c = self.lab.links(self.hosta), self.lab.links(self.ctr)
        bridge = next(n for n in h if n.startswith("npb-"))
        vlan_path = (f"ctr eth0 (mtu {c['eth0']['mtu']}) -> veth -> {bridge} -> eth1.{VLAN} -> "
                     f"eth1 (mtu {h['eth1']['mtu']}) => peer eth1 -> eth1.{VLAN}")
        return {"vlan": vlan_path, "veth": f"ctr veth0 (mtu {c['veth0']['mtu']}) => peer veth0"}

    def teardown(self) -> list[str]:
        """Leave, DeleteEndpoint, DeleteNetwork as dockerd would; returns links of the network left
        in hosta (must be none)."""
        with inside(self.hosta):
            if self.endpoint:
                self.driver.leave(NET_ID, EP_ID)
                self.driver.delete_endpoint(NET_ID, EP_ID)
                self.endpoint = False
            if self.network:
                self.driver.delete_network(NET_ID)
                self.network = False
            with IPRoute() as ipr:
                return sorted(l.name for l in links.list_links(ipr)
                              if l.name.startswith("np") or l.name.startswith("eth1."))


# --- iperf3 ----------------------------------------------------------------------------------------

def listening(pid: int, port: int) -> bool:
    """True once process ``pid``'s netns has a TCP socket listening on ``port``."""
    for table in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{table}") as f:
                rows = f.read().splitlines()[1:]
        except FileNotFoundError:
            continue
        if any(r.split()[1].endswith(f":{port:04X}") and r.split()[3] == "0A" for r in rows):
            return True
    return False


def start_server(ns: str, workdir: Path) -> subprocess.Popen:
    logf = open(workdir / "iperf3-server.log", "wb")
    proc = subprocess.Popen([NSENTER, f"--net={NETNS_DIR}/{ns}", IPERF3, "-s", "-p", str(PORT)],
                            stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                            start_new_session=True)
    logf.close()
    wait_until(lambda: proc.poll() is None and listening(proc.pid, PORT) or proc.poll() is not None,
               60, "the iperf3 server to listen", interval=0.2)
    if proc.poll() is not None:
        raise RuntimeError(f"iperf3 -s exited with {proc.returncode}: "
                           f"{(workdir / 'iperf3-server.log').read_text()[-500:]}")
    return proc


def run_client(ns: str, server: str, seconds: int) -> dict:
    argv = [NSENTER, f"--net={NETNS_DIR}/{ns}", IPERF3, "-c", server, "-p", str(PORT),
            "-t", str(seconds), "-O", "1", "-J"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 120)
    try:
        out = json.loads(proc.stdout)
    except ValueError:
        raise RuntimeError(f"iperf3 -c {server}: exit {proc.returncode}: {proc.stdout[-300:]} "
                           f"{proc.stderr[-300:]}") from None
    if proc.returncode != 0 or "error" in out:
        raise RuntimeError(f"iperf3 -c {server}: exit {proc.returncode}: {out.get('error')}")
    end = out["end"]
    cpu = end.get("cpu_utilization_percent", {})
    return {"bps": end["sum_received"]["bits_per_second"],
            "retrans": end["sum_sent"].get("retransmits", 0),
            "cpu_sender": cpu.get("host_total", float("nan")),
            "cpu_receiver": cpu.get("remote_total", float("nan"))}


# --- report ----------------------------------------------------------------------------------------

def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return "?"


def machine_facts() -> list[str]:
    cpu = next((line.split(":", 1)[1].strip() for line in _read("/proc/cpuinfo").splitlines()
                if line.startswith("model name")), "?")
    mem_kb = next((int(line.split()[1]) for line in _read("/proc/meminfo").splitlines()
                   if line.startswith("MemTotal:")), 0)
    vendor = f"{_read('/sys/class/dmi/id/sys_vendor')} {_read('/sys/class/dmi/id/product_name')}"
    where = ("inside the VM lane (QEMU software emulation, TCG)" if os.path.isfile("/run/vm-lane/vm.conf")
             else "not the VM lane")
    iperf = subprocess.run([IPERF3, "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    import pyroute2
    return [f"nproc {os.cpu_count()}, cpu {cpu}, memory {mem_kb / 1048576:.1f} GiB, "
            f"kernel {platform.release()}",
            f"machine {vendor}; {where}",
            f"{iperf.strip()}, python {platform.python_version()}, pyroute2 {pyroute2.__version__}, "
            f"br_netfilter {'loaded' if os.path.isdir('/sys/module/br_netfilter') else 'not loaded'}"]


def gbit(bps: float) -> str:
    return f"{bps / 1e9:.3f} Gbit/s"


def report(args, results: dict[str, list[dict]], paths: dict[str, str], facts: list[str],
           load0: tuple, total_s: float, leftover: list[str]) -> None:
    med = {k: statistics.median(r["bps"] for r in v) for k, v in results.items()}
    ratio = med["vlan"] / med["veth"]
    print("\n" + "=" * 100)
    print(f"iperf3 TCP, ctr -> peer, {args.seconds} s per run after 1 s omitted, {args.rounds} runs "
          "per path, alternating vlan/veth")
    print("-" * 100)
    for kind in ("vlan", "veth"):
        runs = results[kind]
        print(f"{kind:<5} median {gbit(med[kind]):>16}   runs: "
              + " ".join(f"{r['bps'] / 1e9:.3f}" for r in runs) + " Gbit/s")
        print(f"      retransmits {sum(r['retrans'] for r in runs)}, CPU % sender/receiver (median) "
              f"{statistics.median(r['cpu_sender'] for r in runs):.0f}/"
              f"{statistics.median(r['cpu_receiver'] for r in runs):.0f}   path: {paths[kind]}")
    paired = [a["bps"] / b["bps"] for a, b in zip(results["vlan"], results["veth"])]
    print("-" * 100)
    print(f"ratio VLAN / veth (medians): {ratio:.3f}")
    print("  per-round ratios (same round, back to back): " + " ".join(f"{r:.2f}" for r in paired)
          + f"; their median {statistics.median(paired):.3f}")
    print("-" * 100)
    for fact in facts:
        print(f"machine: {fact}")
    end = os.getloadavg()
    print(f"machine: load average (1/5/15 min) at start {load0[0]:.2f}/{load0[1]:.2f}/{load0[2]:.2f}, "
          f"at end {end[0]:.2f}/{end[1]:.2f}/{end[2]:.2f} (inside the VM: the host's other VMs are "
          "invisible here)")
    host_load = os.environ.get("HOST_LOADAVG")  # the VM cannot see the host: pass it in (README)
    print(f"machine: host load average when the VM started: {host_load or 'unknown (set HOST_LOADAVG)'}"
          " (other VMs on the host take CPU from this one's emulation)")
    print(f"links of the network left in hosta after DeleteNetwork: {leftover or 'none'}")
    print(f"total bench runtime {total_s:.0f} s")
    print("=" * 100)


# --- main ------------------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5, help="iperf3 runs per path (default 5)")
    ap.add_argument("--seconds", type=int, default=5, help="iperf3 -t per run (default 5)")
    args = ap.parse_args()
    if not 1 <= args.rounds <= 50 or not 1 <= args.seconds <= 120:
        ap.error("need 1 <= --rounds <= 50 and 1 <= --seconds <= 120")
    reason = cannot_run()
    if reason:
        print(f"cannot run here: {reason}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _sigterm_as_interrupt)

    started, load0 = time.perf_counter(), os.getloadavg()
    workdir = Path(tempfile.mkdtemp(prefix=LAB_PREFIX + "vbench-", dir="/tmp"))
    lab = Lab()
    setup = server = None
    ok = False
    try:
        log("building the namespaces, the VLAN network (driver in-process) and the veth pair ...")
        setup = Setup(lab, workdir)
        setup.build()
        paths = setup.describe()
        server = start_server(setup.peer, workdir)
        for kind, dst in (("vlan", PEER_VLAN_IP), ("veth", PEER_VETH_IP)):  # both paths work
            if not lab.ping(setup.ctr, dst, wait=3):
                raise RuntimeError(f"ctr cannot ping {dst} over the {kind} path")
        results: dict[str, list[dict]] = {"vlan": [], "veth": []}
        targets = {"vlan": PEER_VLAN_IP, "veth": PEER_VETH_IP}
        log("iperf3 warm-up: one untimed 2 s run per path ...")
        for dst in (PEER_VLAN_IP, PEER_VETH_IP):
            run_client(setup.ctr, dst, 1)
        log(f"iperf3: {args.rounds} rounds of vlan + veth, -t {args.seconds} -O 1 ...")
        for i in range(args.rounds):
            for kind in (("vlan", "veth") if i % 2 == 0 else ("veth", "vlan")):
                res = run_client(setup.ctr, targets[kind], args.seconds)
                results[kind].append(res)
                log(f"  round {i + 1} {kind}: {gbit(res['bps'])} (retransmits {res['retrans']})")
        stop_popen(server, 10)
        server = None
        leftover = setup.teardown()
        if leftover:
            raise RuntimeError(f"DeleteNetwork left links in hosta: {leftover}")
        report(args, results, paths, machine_facts(), load0, time.perf_counter() - started, leftover)
        ok = True
    except BaseException as exc:  # noqa: BLE001 - report, then tear down
        print(f"\nBENCH FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
        if not isinstance(exc, KeyboardInterrupt):
            import traceback
            traceback.print_exc()
    finally:
        errors = []
        if server is not None:
            stop_popen(server, 10)
        if setup is not None:
            try:
                setup.teardown()
            except Exception as exc:  # noqa: BLE001
                errors.append(f"driver teardown: {exc}")
        try:
            lab.destroy()
        except Exception as exc:  # noqa: BLE001
            errors.append(str(exc))
        errors += cleanup_all()
        shutil.rmtree(workdir, ignore_errors=True)
        if errors:
            print(f"cleanup errors: {errors}", file=sys.stderr)
            ok = False
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

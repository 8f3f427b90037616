#!/usr/bin/env python3
"""Per-container bandwidth limits through the real driver (see bench/README.md "shaping_bench.py").

Netplugin's driver runs in this process with this thread inside a lab netns "host". That netns has a
static network (10.77.0.0/16) on parent eth1. eth1's veth peer r0 10.77.0.1/16 sits in netns "router",
where one iperf3 server runs. A container is a netns that gets the endpoint's veth moved in, as Docker
does it (tests/kernel/conftest.py plug_container).

1. Accuracy: containers with --driver-opt egress=10/100/1000mbit send to the router (iperf3 TCP -O 1).
   A container with ingress=100mbit receives from it (iperf3 -R). The table shows measured / limit.
2. Throughput of an UNSHAPED container to the router with 1 shaped endpoint on the network, then with
   --endpoints shaped endpoints (the extra ones created and joined through the driver, their container
   ends parked in one shared netns, up, sending nothing), then with 1 again: A B A, ratio B / A.
3. driver.shape(endpoint, rate, None) latency with --changes changes alternating 50mbit / 80mbit, at
   each of the A B A populations.

Everything lives in namespaces the lab creates. It is torn down at the end, also on failure, Ctrl-C or
SIGTERM. A measurement, not a test: exit 0 unless the bench itself fails.

    .venv/bin/python bench/shaping_bench.py [--seconds 4] [--endpoints 1000] [--changes 50] [--runs 3]
"""
from __future__ import annotations

import argparse
import json
import os
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
from netplugin.kernel import shaping as tc  # noqa: E402
from netplugin.service import Services  # noqa: E402
from tests.lab import LAB_PREFIX, NETNS_DIR, NSENTER, OWNER_PID, cleanup_all, skip_reason, stop_popen  # noqa: E402
from tests.lab import wait_until  # noqa: E402
from tests.lab.netns import Lab, entered  # noqa: E402

IPERF3 = "/usr/bin/iperf3"
PORT = 5201
NET = "5b" * 32
ROUTER = "10.77.0.1"
IPV4 = [{"AddressSpace": "local", "Pool": "10.77.0.0/16", "Gateway": f"{ROUTER}/16"}]
RATES = ("50mbit", "80mbit")  # what part 3 alternates between
TOLERANCE = 0.10


def log(msg: str) -> None:
    print(f"[{time.strftime('%T')}] {msg}", flush=True)


def _on_sigterm(*_):
    # pyroute2 forks helpers from this process and ends them with SIGTERM: a helper must die as
    # SIGTERM would kill it, never unwind through main() (whose finally would tear the lab down).
    if os.getpid() != OWNER_PID:
        os._exit(143)
    sys.exit(143)


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))]


def ep_id(n: int) -> str:
    return f"b{n:010x}".ljust(64, "0")  # the first 11 characters (the veth names) differ


def parked_address(n: int) -> str:
    return f"10.77.{1 + n // 250}.{1 + n % 250}"


class Bench:
    def __init__(self, lab: Lab, workdir: Path):
        self.lab = lab
        self.host, self.router, self.park = lab.netns("host"), lab.netns("router"), lab.netns("park")
        for ns in (self.host, self.router, self.park):  # IPv4 only: no IPv6 chatter on 2,000 veths
            lab.sh(ns, ["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"])
        lab.veth(self.host, "eth1", self.router, "r0")
        lab.addr(self.router, "r0", f"{ROUTER}/16")
        self.host_ino = os.stat(f"{NETNS_DIR}/{self.host}").st_ino
        self.driver = Services(netconfig.load(overrides={"state_dir": str(workdir / "state")}, environ={})).driver
        self.endpoints: list[str] = []  # created through the driver, still there
        self.network = False
        self.hipr = self.pipr = None

    def check_inside(self) -> None:
        """The driver acts on this thread's netns: never let it run outside the lab's host."""
        if os.stat("/proc/thread-self/ns/net").st_ino != self.host_ino:
            raise RuntimeError("not inside the lab's host netns: refusing to call the driver")

    def open_sockets(self) -> None:
        self.check_inside()
        self.hipr = IPRoute()
        with entered(self.park):
            self.pipr = IPRoute()  # the socket stays in park

    def create_network(self) -> None:
        self.check_inside()
        self.driver.create_network(NET, {"com.docker.network.generic": {"parent": "eth1"}}, IPV4, [])
        self.network = True

    def plug(self, n: int, address: str, options: dict, ns: str | None = None) -> float:
        """CreateEndpoint + Join (timed), then the container end goes into ``ns`` as eth0 with its
        address and default route, or (``ns`` None) into the parking netns, up, nothing else."""
        self.check_inside()
        eid = ep_id(n)
        t0 = time.perf_counter()
        self.driver.create_endpoint(NET, eid, {"Address": f"{address}/16"}, options)
        self.endpoints.append(eid)
        join = self.driver.join(NET, eid, "/bench")
        took = time.perf_counter() - t0
        src = join["InterfaceName"]["SrcName"]
        self.hipr.link("set", index=self.hipr.link_lookup(ifname=src)[0], net_ns_fd=ns or self.park)
        if ns is None:
            self.pipr.link("set", index=self.pipr.link_lookup(ifname=src)[0], state="up")
            return took
        with self.lab.ipr(ns) as ipr:
            idx = ipr.link_lookup(ifname=src)[0]
            ipr.link("set", index=idx, ifname="eth0", state="up")
            ipr.addr("add", index=idx, address=address, prefixlen=16)
            ipr.route("add", dst="0.0.0.0/0", gateway=join["Gateway"])
        return took

    def unplug(self, n: int) -> float:
        self.check_inside()
        eid = ep_id(n)
        t0 = time.perf_counter()
        self.driver.leave(NET, eid)
        self.driver.delete_endpoint(NET, eid)
        self.endpoints.remove(eid)
        return time.perf_counter() - t0

    def container(self, n: int, address: str, options: dict) -> str:
        ns = self.lab.netns(f"c{n}")
        self.lab.sh(ns, ["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"])
        self.plug(n, address, options, ns)
        return ns

    def shape_times(self, n: int, changes: int) -> list[float]:
        self.check_inside()
        times = []
        for i in range(changes):
            t0 = time.perf_counter()
            reply = self.driver.shape(ep_id(n), RATES[i % 2], None)
            times.append(time.perf_counter() - t0)
            if reply["egress"] != f"{RATES[i % 2]} (admin)":
                raise RuntimeError(f"shape did not take: {reply}")
        return times

    def teardown(self) -> list[str]:
        """Leave + DeleteEndpoint of what is left, DeleteNetwork; returns what the driver left behind
        in the host netns (must be nothing)."""
        self.check_inside()
        for eid in list(reversed(self.endpoints)):
            self.driver.leave(NET, eid)
            self.driver.delete_endpoint(NET, eid)
            self.endpoints.remove(eid)
        if self.network:
            self.driver.delete_network(NET)
            self.network = False
        left = []
        if "htb" in subprocess.run(["tc", "qdisc", "show", "dev", "eth1"], capture_output=True, text=True).stdout:
            left.append("htb on eth1")
        if tc.SET_NAME in subprocess.run(["ipset", "list", "-n"], capture_output=True, text=True).stdout.split():
            left.append(f"ipset {tc.SET_NAME}")
        if tc.CHAIN in subprocess.run(["iptables", "-w", "-t", "mangle", "-S"], capture_output=True, text=True).stdout:
            left.append(f"mangle chain {tc.CHAIN}")
        return left

    def close_sockets(self) -> None:
        for ipr in (self.hipr, self.pipr):
            if ipr is not None:
                ipr.close()
        self.hipr = self.pipr = None


# --- iperf3 ----------------------------------------------------------------------------------------

def listening(pid: int) -> bool:
    rows = []
    for table in ("tcp", "tcp6"):  # iperf3 listens on :: (v4-mapped) where it can
        try:
            with open(f"/proc/{pid}/net/{table}") as f:
                rows += f.read().splitlines()[1:]
        except FileNotFoundError:
            return False
    return any(r.split()[1].endswith(f":{PORT:04X}") and r.split()[3] == "0A" for r in rows)


def start_server(ns: str, workdir: Path) -> subprocess.Popen:
    with open(workdir / "iperf3-server.log", "wb") as logf:
        proc = subprocess.Popen([NSENTER, f"--net={NETNS_DIR}/{ns}", IPERF3, "-s", "-p", str(PORT)],
                                stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        wait_until(lambda: proc.poll() is not None or listening(proc.pid), 30, "iperf3 -s to listen", 0.1)
        if proc.poll() is not None:
            raise RuntimeError(f"iperf3 -s exited: {(workdir / 'iperf3-server.log').read_text()[-300:]}")
    except BaseException:
        stop_popen(proc, 10)  # it outlives its netns otherwise
        raise
    return proc


def iperf(ns: str, seconds: int, reverse: bool = False) -> float:
    """Mbit/s received in one iperf3 TCP run from ``ns`` to the router (-R: the other way), 1 s omitted."""
    argv = [NSENTER, f"--net={NETNS_DIR}/{ns}", IPERF3, "-c", ROUTER, "-p", str(PORT), "-t", str(seconds),
            "-O", "1", "-J"] + (["-R"] if reverse else [])
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    try:
        out = json.loads(proc.stdout)
    except ValueError:
        raise RuntimeError(f"iperf3 from {ns}: exit {proc.returncode}: {proc.stderr[-300:]}") from None
    if proc.returncode != 0 or "error" in out:
        raise RuntimeError(f"iperf3 from {ns}: exit {proc.returncode}: {out.get('error')}")
    return out["end"]["sum_received"]["bits_per_second"] / 1e6


# --- the run ---------------------------------------------------------------------------------------

def measure(args, bench: Bench, workdir: Path) -> dict:
    res: dict = {}
    bench.open_sockets()
    bench.create_network()
    mtu = bench.hipr.get_links(ifname="eth1")[0].get_attr("IFLA_MTU")
    res["goodput"] = (mtu - 52) / (mtu + 14)  # TCP payload (timestamps on) / Ethernet frame HTB counts
    server = start_server(bench.router, workdir)
    try:
        free = bench.container(1, "10.77.0.11", {})
        res["free"] = []  # no shaped endpoint yet: no HTB on eth1, no mangle rule
        for r in range(args.runs):
            res["free"].append(iperf(free, args.seconds))
            log(f"run {r + 1}, nothing shaped yet: unshaped container -> router {res['free'][-1]:.0f} Mbit/s")
        # 1. accuracy; the 100mbit egress container stays as part 2's one shaped endpoint
        res["accuracy"] = []
        for n, (direction, rate) in enumerate(
                (("egress", "10mbit"), ("egress", "1000mbit"), ("ingress", "100mbit"), ("egress", "100mbit"))):
            ns = bench.container(10 + n, f"10.77.0.{20 + n}", {direction: rate})
            got = iperf(ns, args.seconds, reverse=direction == "ingress")
            res["accuracy"].append((direction, rate, got))
            log(f"{direction} {rate}: {got:.1f} Mbit/s")
        for n in (10, 11, 12):
            bench.unplug(n)
        kept = 13
        # 2. + 3. A B A
        res["A"], res["B"], res["shape"] = [], [], {}
        extra = list(range(1000, 1000 + args.endpoints - 1))
        for phase in ("A1", "B", "A2"):
            if phase == "B":
                log(f"creating and joining {len(extra)} more shaped endpoints (egress 20mbit each) ...")
                t0, res["join"] = time.perf_counter(), []
                for k, n in enumerate(extra):
                    res["join"].append(bench.plug(n, parked_address(k), {"egress": "20mbit"}))
                    if (k + 1) % 100 == 0 or k + 1 == len(extra):
                        log(f"  {k + 1} joined; CreateEndpoint+Join of the last: "
                            f"{res['join'][-1] * 1000:.0f} ms")
                res["join_total"] = time.perf_counter() - t0
                with IPRoute() as ipr:
                    res["classes"] = len(tc.classes(ipr, "eth1"))
                res["set_entries"] = len(tc.entries())
                log(f"  {res['classes']} HTB classes on eth1, {res['set_entries']} ipset entries")
            if phase == "A2":
                log(f"removing the {len(extra)} again (Leave + DeleteEndpoint) ...")
                t0 = time.perf_counter()
                res["leave"] = [bench.unplug(n) for n in extra]
                res["leave_total"] = time.perf_counter() - t0
            key = phase[0]
            for r in range(args.runs):
                res[key].append(iperf(free, args.seconds))
                log(f"{phase} run {r + 1}: unshaped container -> router {res[key][-1]:.0f} Mbit/s")
            res["shape"][phase] = bench.shape_times(kept, args.changes)
            log(f"{phase}: {args.changes} shape() calls, p50 {pct(res['shape'][phase], 50) * 1000:.1f} ms, "
                f"p99 {pct(res['shape'][phase], 99) * 1000:.1f} ms")
    finally:
        stop_popen(server, 10)
    log("Leave + DeleteEndpoint of the rest, DeleteNetwork ...")
    res["left"] = bench.teardown()
    return res


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def report(args, res: dict, load0: tuple, total: float) -> None:
    g = res["goodput"]
    print("\n" + "=" * 100)
    print(f"1. accuracy, iperf3 TCP {args.seconds} s after 1 s omitted, 1 run each. TCP goodput is at most "
          f"{g:.3f} of the wire rate HTB/TBF count (MTU payload / frame): a perfect limiter shows raw ~{g:.3f}")
    print(f"   {'limit':<20}{'measured':>12}{'raw ratio':>11}{'ratio / goodput':>17}   target: raw within ±10%")
    for direction, rate, got in res["accuracy"]:
        raw = got / (tc.parse_rate(rate) / 1e6)
        print(f"   {direction + ' ' + rate:<20}{got:>8.1f} Mb/s{raw:>11.3f}{raw / g:>17.3f}   "
              f"{verdict(abs(raw - 1) <= TOLERANCE)}")
    ma, mb = statistics.median(res["A"]), statistics.median(res["B"])  # A: both A phases
    n = args.endpoints
    print(f"2. unshaped container -> router, with 1 (A) vs {n} (B) shaped endpoints on the network, "
          f"{args.runs} runs per phase, A B A")
    print(f"   A before: {' '.join(f'{v:.0f}' for v in res['A'][:args.runs])}   B: "
          f"{' '.join(f'{v:.0f}' for v in res['B'])}   A after: {' '.join(f'{v:.0f}' for v in res['A'][args.runs:])}"
          " Mbit/s")
    print(f"   median A {ma:.0f}, median B {mb:.0f} Mbit/s; ratio B / A {mb / ma:.3f}   target >= 0.95: "
          f"{verdict(mb / ma >= 0.95)}")
    a1, a2 = statistics.median(res["A"][:args.runs]), statistics.median(res["A"][args.runs:])
    print(f"   per phase A1/B/A2 medians: {a1:.0f} / {mb:.0f} / {a2:.0f}; A2 / A1 {a2 / a1:.3f} (the drift "
          "between the two baselines: the noise floor of the ratio)")
    print(f"   for reference, before anything was shaped (no HTB on eth1, no mangle rule): median "
          f"{statistics.median(res['free']):.0f} Mbit/s, runs {' '.join(f'{v:.0f}' for v in res['free'])}")
    s = res["shape"]
    print(f"3. driver.shape(endpoint, 50mbit|80mbit) latency, {args.changes} changes per phase")
    for phase, label in (("A1", "1 shaped"), ("B", f"{n} shaped"), ("A2", "1 shaped")):
        print(f"   {phase:<3}{label:<14} p50 {pct(s[phase], 50) * 1000:7.1f} ms   p99 {pct(s[phase], 99) * 1000:7.1f} ms")
    base50 = statistics.median(s["A1"] + s["A2"])
    base99 = pct(s["A1"] + s["A2"], 99)
    print(f"   ratio {n} / 1: p50 {pct(s['B'], 50) / base50:.2f}, p99 {pct(s['B'], 99) / base99:.2f}")
    if res.get("join"):
        j, lv = res["join"], res["leave"]
        print(f"setup cost: {len(j)} x CreateEndpoint+Join (egress option) + parking the container end: "
              f"{res['join_total']:.0f} s; CreateEndpoint+Join p50 {pct(j, 50) * 1000:.0f} ms, "
              f"p99 {pct(j, 99) * 1000:.0f} ms, first {j[0] * 1000:.0f} ms, last {j[-1] * 1000:.0f} ms; "
              f"{res['classes']} HTB classes, {res['set_entries']} ipset entries")
        print(f"            {len(lv)} x Leave+DeleteEndpoint: {res['leave_total']:.0f} s; each p50 "
              f"{pct(lv, 50) * 1000:.0f} ms, p99 {pct(lv, 99) * 1000:.0f} ms, first {lv[0] * 1000:.0f} ms, "
              f"last {lv[-1] * 1000:.0f} ms")
    print(f"left behind in the host netns after DeleteNetwork: {', '.join(res['left']) or 'nothing'}")
    end = os.getloadavg()
    print(f"machine: nproc {os.cpu_count()}, kernel {os.uname().release}, load average (1/5/15 min) at start "
          f"{load0[0]:.2f}/{load0[1]:.2f}/{load0[2]:.2f}, at end {end[0]:.2f}/{end[1]:.2f}/{end[2]:.2f}; "
          f"total {total:.0f} s")
    print("=" * 100)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=4, help="iperf3 -t per run (default 4)")
    ap.add_argument("--endpoints", type=int, default=1000, help="shaped endpoints in phase B (default 1000)")
    ap.add_argument("--changes", type=int, default=50, help="shape() calls per phase (default 50)")
    ap.add_argument("--runs", type=int, default=3, help="iperf3 runs per phase of part 2 (default 3)")
    args = ap.parse_args()
    if not (1 <= args.seconds <= 120 and 2 <= args.endpoints <= 60000 and 1 <= args.changes and 1 <= args.runs):
        ap.error("need 1 <= --seconds <= 120, 2 <= --endpoints <= 60000, --changes >= 1, --runs >= 1")
    reason = skip_reason() or (None if os.access(IPERF3, os.X_OK) else f"{IPERF3} is missing")
    if reason:
        print(f"cannot run here: {reason}", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, _on_sigterm)
    started, load0 = time.monotonic(), os.getloadavg()
    workdir = Path(tempfile.mkdtemp(prefix=LAB_PREFIX + "shbench-", dir="/tmp"))
    lab = Lab()
    ok, errors = False, []
    try:
        log(f"lab: host/router/park namespaces, static network on eth1; {args.endpoints} endpoints in phase B")
        bench = Bench(lab, workdir)
        with entered(bench.host):
            try:
                res = measure(args, bench, workdir)
            finally:
                try:
                    bench.teardown()  # a no-op after a complete run
                except Exception as exc:  # noqa: BLE001
                    errors.append(f"driver teardown: {exc}")
                bench.close_sockets()
        report(args, res, load0, time.monotonic() - started)
        ok = True
    except BaseException as exc:  # noqa: BLE001 - report, then tear down
        print(f"\nBENCH FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
        if not isinstance(exc, (KeyboardInterrupt, SystemExit)):
            import traceback
            traceback.print_exc()
    finally:
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

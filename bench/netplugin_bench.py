#!/usr/bin/env python3
"""netplugin side-by-side benchmark on the e2e lab's emulated physical network (see bench/README.md).

1. ``docker run -d`` of a busybox ``sleep`` container on a netplugin static network versus on a
   user-defined Docker bridge network, in the same test dockerd (inside the lab's "hosta" netns),
   interleaved A B A B ...; median of each and their ratio (target <= 1.10).
2. CreateEndpoint+Join latency posted straight to the plugin socket (as dockerd does) with 10 and
   with N (default 1,000) joined endpoints on one network; p50/p99 and p99(N)/p99(10) (target <= 1.2).

Everything runs in network namespaces the lab creates; all of it is torn down at the end, also on
failure, Ctrl-C or SIGTERM. A missed target is reported, not an error: exit 0. Exit 1 on failure.

    /work/main/.venv/bin/python bench/netplugin_bench.py [--runs N] [--endpoints 1000] [--samples 200]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
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

from tests.lab import LAB_PREFIX, OWNER_PID, cleanup_all, plugin_post, skip_reason  # noqa: E402
from tests.lab.dockerd import Dockerd  # noqa: E402
from tests.lab.image import IMAGE, build_busybox_tar  # noqa: E402
from tests.lab.netns import Lab, build_physnet, list_netns, stale_netns  # noqa: E402
from tests.lab.plugin import Plugin  # noqa: E402

RUN_TARGET, P99_TARGET = 1.10, 1.2
SMALL = 10  # the small endpoint population
WARMUP = 5  # untimed CreateEndpoint+Join samples before each measured series
SAMPLE_ADDR = "10.77.200.10/16"  # reused by every measured sample (deleted after each)


def log(msg: str) -> None:
    print(f"[{time.strftime('%T')}] {msg}", flush=True)


def pct(values: list[float], q: float) -> float:
    """Percentile ``q`` (0..100) with linear interpolation between closest ranks."""
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def _sigterm_as_interrupt(signum, frame):
    if os.getpid() != OWNER_PID:  # a forked pyroute2 helper: die as SIGTERM normally would
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        os._exit(128 + signum)
    raise KeyboardInterrupt(f"signal {signum}")


# --- 1. docker run -d: netplugin static network vs Docker's bridge ---------------------------------

def bench_docker_run(dockerd: Dockerd, plugin: Plugin, runs: int) -> dict[str, list[float]]:
    d = dockerd.docker
    d("network", "create", "-d", plugin.name, "--ipam-driver", plugin.name, "--subnet", "10.77.0.0/24",
      "--gateway", "10.77.0.1", "-o", "parent=eth1", "pubnet")
    d("network", "create", "-d", "bridge", "--subnet", "10.88.0.0/24", "refnet")
    kinds = {"netplugin": ("pubnet", "10.77.0.{}"), "bridge": ("refnet", "10.88.0.{}")}
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for i in range(runs + 1):  # i == 0 is the warm-up pair
        for kind, (network, ip) in kinds.items():
            name = f"bench-{kind}-{i}"
            t0 = time.perf_counter()
            d("run", "-d", "--network", network, "--ip", ip.format(100 + i), "--name", name,
              IMAGE, "sleep", "3600")
            took = time.perf_counter() - t0
            running = d("inspect", "-f", "{{.State.Running}}", name).stdout.strip()
            if running != "true":
                raise RuntimeError(f"{name} is not running after docker run -d ({running!r})")
            d("rm", "-f", name)  # not timed
            if i:
                times[kind].append(took)
        if i == 0:
            log("   warm-up pair done")
    d("network", "rm", "pubnet", "refnet")
    return times


# --- 2. CreateEndpoint+Join latency against the plugin socket --------------------------------------

class PluginApi:
    def __init__(self, plugin: Plugin):
        self.sock = plugin.socket

    def __call__(self, endpoint: str, body: dict) -> dict:
        status, reply = plugin_post(self.sock, endpoint, body, timeout=120)
        if status != 200 or reply.get("Err"):
            raise RuntimeError(f"{endpoint} answered {status}: {reply}")
        return reply


class Population:
    """Endpoints joined on one plugin network; their container ends are moved into a 'sandbox'
    netns (as Docker moves them into containers) and set up, so hosta holds only the bridge ports."""

    def __init__(self, api: PluginApi, physnet, sandbox: str):
        self.api, self.physnet, self.sandbox = api, physnet, sandbox
        self.net_id = secrets.token_hex(32)
        self.ids: list[str] = []
        self.created = False

    def create_network(self) -> None:
        self.api("/NetworkDriver.CreateNetwork", {
            "NetworkID": self.net_id,
            "Options": {"com.docker.network.generic": {"parent": self.physnet.parent}},
            "IPv4Data": [{"AddressSpace": "", "Pool": "10.77.0.0/16", "Gateway": "10.77.0.1/16"}],
            "IPv6Data": []})
        self.created = True

    def up(self, ep_id: str, address: str) -> float:
        """CreateEndpoint + Join; returns their combined wall time."""
        t0 = time.perf_counter()
        self.api("/NetworkDriver.CreateEndpoint", {"NetworkID": self.net_id, "EndpointID": ep_id,
                                                   "Interface": {"Address": address}, "Options": {}})
        reply = self.api("/NetworkDriver.Join", {"NetworkID": self.net_id, "EndpointID": ep_id,
                                                 "SandboxKey": "/x", "Options": {}})
        took = time.perf_counter() - t0
        if not reply.get("InterfaceName", {}).get("SrcName"):
            raise RuntimeError(f"Join reply without InterfaceName: {reply}")
        return took

    def down(self, ep_id: str) -> float:
        t0 = time.perf_counter()
        self.api("/NetworkDriver.Leave", {"NetworkID": self.net_id, "EndpointID": ep_id})
        self.api("/NetworkDriver.DeleteEndpoint", {"NetworkID": self.net_id, "EndpointID": ep_id})
        return time.perf_counter() - t0

    @staticmethod
    def address(i: int) -> str:
        return f"10.77.{1 + i // 200}.{10 + i % 200}/16"

    def grow(self, target: int) -> tuple[float, list[float]]:
        """Add endpoints until ``target`` exist; returns (wall seconds, CE+Join latencies)."""
        lab, hosta = self.physnet.lab, self.physnet.hosta
        lats: list[float] = []
        t0 = time.perf_counter()
        with lab.ipr(hosta) as ipr_a, lab.ipr(self.sandbox) as ipr_s:
            while len(self.ids) < target:
                ep_id = secrets.token_hex(32)
                lats.append(self.up(ep_id, self.address(len(self.ids))))
                self.ids.append(ep_id)
                peer = "npc-" + ep_id[:11]  # netplugin.kernel.names.peer_veth_name
                ipr_a.link("set", index=ipr_a.link_lookup(ifname=peer)[0], net_ns_fd=self.sandbox)
                ipr_s.link("set", index=ipr_s.link_lookup(ifname=peer)[0], state="up")
                if len(self.ids) % 250 == 0:
                    log(f"  {len(self.ids)} endpoints ({time.perf_counter() - t0:.1f}s, last CE+Join "
                        f"{ms(lats[-1])})")
        return time.perf_counter() - t0, lats

    def sample(self, n: int) -> tuple[list[float], list[float]]:
        """``n`` CE+Join timings (each followed by an untimed Leave+DeleteEndpoint)."""
        ups, downs = [], []
        for i in range(WARMUP + n):
            ep_id = secrets.token_hex(32)
            took = self.up(ep_id, SAMPLE_ADDR)
            down = self.down(ep_id)
            if i >= WARMUP:
                ups.append(took)
                downs.append(down)
        return ups, downs

    def shrink(self, target: int) -> float:
        """Leave+DeleteEndpoint the newest endpoints until ``target`` remain; returns seconds."""
        t0 = time.perf_counter()
        while len(self.ids) > target:
            self.down(self.ids[-1])
            self.ids.pop()
        return time.perf_counter() - t0

    def delete_network(self) -> None:
        if self.created:
            self.api("/NetworkDriver.DeleteNetwork", {"NetworkID": self.net_id})
            self.created = False


def leftover_links(physnet, sandbox: str) -> list[str]:
    lab = physnet.lab
    return sorted(f"{ns}:{n}" for ns in (physnet.hosta, sandbox) for n in lab.links(ns)
                  if n.startswith("np"))


def bench_endpoints(plugin: Plugin, physnet, sandbox: str, big: int, samples: int) -> dict:
    pop = Population(PluginApi(plugin), physnet, sandbox)
    res: dict = {}
    first = samples // 2  # A B A: half the small series before the big one, half after
    try:
        pop.create_network()
        pop.grow(SMALL)
        log(f"{SMALL} endpoints joined; {first} samples of CreateEndpoint+Join ...")
        small_a, down_a = pop.sample(first)
        log(f"growing the population to {big} joined endpoints ...")
        res["grow_s"], res["grow_lats"] = pop.grow(big)
        res["ports"] = sum(1 for i in physnet.lab.links(physnet.hosta).values() if i["master"])
        log(f"{big} endpoints joined in {res['grow_s']:.1f}s ({res['ports']} bridge ports in hosta); "
            f"{samples} samples ...")
        time.sleep(2)  # let the IPv6 DAD/MLD chatter of the newest ports settle
        res["big"], res["big_down"] = pop.sample(samples)
        log(f"shrinking back to {SMALL} endpoints through the plugin API ...")
        res["shrink_s"] = pop.shrink(SMALL)
        log(f"{samples - first} more samples at {SMALL} endpoints ...")
        small_b, down_b = pop.sample(samples - first)
        res["small"], res["small_down"] = small_a + small_b, down_a + down_b
        res["small_halves"] = (pct(small_a, 50), pct(small_b, 50))
        pop.shrink(0)
        pop.delete_network()
        res["leftover"] = leftover_links(physnet, sandbox)
        return res
    finally:
        if pop.created:  # failure/interrupt: DeleteNetwork removes every endpoint's links as well
            try:
                pop.api("/NetworkDriver.DeleteNetwork", {"NetworkID": pop.net_id})
            except Exception as exc:  # noqa: BLE001 - teardown goes on
                print(f"bench teardown: DeleteNetwork failed: {exc}", file=sys.stderr)


# --- report ----------------------------------------------------------------------------------------

def verdict(value: float, target: float) -> str:
    return "ok" if value <= target else "MISSED"


def machine_facts(dockerd: Dockerd) -> list[str]:
    server = dockerd.docker("version", "--format", "{{.Server.Version}}", check=False).stdout.strip()
    import pyroute2
    return [f"nproc {os.cpu_count()}, kernel {platform.release()}, docker engine {server or '?'} "
            f"(test dockerd in a netns), python {platform.python_version()}, "
            f"pyroute2 {pyroute2.__version__}"]


def load_note(start: tuple) -> str:
    """Load average at start and end: other work on the machine skews every number above."""
    end = os.getloadavg()
    note = f"load average (1/5/15 min) at start {start[0]:.2f}/{start[1]:.2f}/{start[2]:.2f}, " \
           f"at end {end[0]:.2f}/{end[1]:.2f}/{end[2]:.2f}"
    busy = start[0] > 0.5 * (os.cpu_count() or 1)
    return note + ("  <- the machine was busy before the bench started: expect noise" if busy else "")


def plugin_status(plugin: Plugin) -> dict:
    proc = subprocess.run([sys.executable, "-m", "netplugin", "status", "--json", "--state-dir",
                           str(plugin.state_dir)], capture_output=True, text=True, timeout=60,
                          check=True, cwd=REPO)
    return json.loads(proc.stdout)


def report(args, runs: dict, eps: dict, facts: list[str], total_s: float) -> None:
    rows = []
    a, b = statistics.median(runs["netplugin"]), statistics.median(runs["bridge"])
    ratio = a / b
    rows += [(f"docker run -d median, netplugin static ({args.runs} runs)", ms(a), "", ""),
             (f"docker run -d median, docker bridge    ({args.runs} runs)", ms(b), "", ""),
             ("  ratio netplugin / bridge", f"{ratio:.3f}", f"<= {RUN_TARGET:.2f}",
              verdict(ratio, RUN_TARGET))]
    small, big, n = eps["small"], eps["big"], args.endpoints
    p99_ratio = pct(big, 99) / pct(small, 99)
    rows += [(f"CreateEndpoint+Join p50 @ {SMALL} endpoints", ms(pct(small, 50)), "", ""),
             (f"CreateEndpoint+Join p99 @ {SMALL} endpoints", ms(pct(small, 99)), "", ""),
             (f"CreateEndpoint+Join p50 @ {n} endpoints", ms(pct(big, 50)), "", ""),
             (f"CreateEndpoint+Join p99 @ {n} endpoints", ms(pct(big, 99)), "", ""),
             (f"  ratio p99({n}) / p99({SMALL})", f"{p99_ratio:.2f}", f"<= {P99_TARGET}",
              verdict(p99_ratio, P99_TARGET))]
    grow = eps["grow_lats"]
    info = [(f"Leave+DeleteEndpoint p50 @ {SMALL} / @ {n} (untimed above)",
             f"{pct(eps['small_down'], 50) * 1000:.1f} / {ms(pct(eps['big_down'], 50))}"),
            (f"CE+Join p50 @ {SMALL}: series before / after the {n} series",
             f"{eps['small_halves'][0] * 1000:.1f} / {ms(eps['small_halves'][1])}"),
            (f"population build {SMALL} -> {n} ({len(grow)} endpoints)", f"{eps['grow_s']:.1f} s"),
            ("  CE+Join p50, first 100 / last 100 of the build",
             f"{pct(grow[:100], 50) * 1000:.1f} / {ms(pct(grow[-100:], 50))}"),
            (f"teardown {n} -> {SMALL} endpoints (Leave+DeleteEndpoint)", f"{eps['shrink_s']:.1f} s"),
            ("np* links left in hosta/sandbox after teardown", str(len(eps["leftover"]))),
            ("total bench runtime", f"{total_s:.0f} s")]
    print("\n" + "=" * 100)
    print(f"{'metric':<62}{'value':>14}  {'target':<9}{'verdict'}")
    print("-" * 100)
    for name, value, target, v in rows:
        print(f"{name:<62}{value:>14}  {target:<9}{v}")
    print("-" * 100)
    for name, value in info:
        print(f"{name:<62}{value:>14}")
    print("-" * 100)
    for fact in facts:
        print(f"machine: {fact}")
    print(f"machine: {load_note(args.load0)}")
    print("samples (ms): netplugin run " + " ".join(f"{x * 1000:.0f}" for x in runs["netplugin"]))
    print("              bridge run    " + " ".join(f"{x * 1000:.0f}" for x in runs["bridge"]))
    print("=" * 100)


# --- main ------------------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=15, help="docker run -d runs per kind (default 15)")
    ap.add_argument("--endpoints", type=int, default=1000, help="large population (default 1000)")
    ap.add_argument("--samples", type=int, default=200, help="CE+Join samples per population")
    ap.add_argument("--log-level", default="info", choices=["debug", "info", "warning"],
                    help="plugin log level (default info, as deployed; the e2e tests use debug)")
    args = ap.parse_args()
    if not 1 <= args.runs <= 150 or not SMALL < args.endpoints <= 20000 or args.samples < 2:
        ap.error("need 1 <= --runs <= 150, 10 < --endpoints <= 20000, --samples >= 2")
    reason = skip_reason()
    if reason:
        print(f"cannot run the lab here: {reason}", file=sys.stderr)
        return 2
    if stale_netns():
        print(f"note: netns left by dead lab runs (remove by hand): {stale_netns()}", file=sys.stderr)
    signal.signal(signal.SIGTERM, _sigterm_as_interrupt)

    started, args.load0 = time.perf_counter(), os.getloadavg()
    workdir = Path(tempfile.mkdtemp(prefix=LAB_PREFIX + "bench-", dir="/tmp"))
    lab = Lab()
    dockerd = plugin = None
    ok = False
    try:
        log("building the emulated network, starting dockerd and the plugin ...")
        physnet = build_physnet(lab)
        sandbox = lab.netns("sandbox")
        for key in ("all", "default"):  # like containers on a v4-only network: no IPv6 chatter
            lab.sh(sandbox, ["sysctl", "-qw", f"net.ipv6.conf.{key}.disable_ipv6=1"])
        dockerd = Dockerd(physnet.hosta, log_path=workdir / "dockerd.log")
        dockerd.start()
        dockerd.import_image(build_busybox_tar(workdir / "busybox.tar"), IMAGE)
        plugin = Plugin(physnet.hosta, workdir / "plugin", name=f"npbench{secrets.token_hex(3)}",
                        extra_args=("--log-level", args.log_level))
        plugin.start()
        facts = machine_facts(dockerd)

        log(f"1. docker run -d: {args.runs} interleaved runs per kind (+1 warm-up each) ...")
        runs = bench_docker_run(dockerd, plugin, args.runs)
        log(f"   medians: netplugin {ms(statistics.median(runs['netplugin']))}, "
            f"bridge {ms(statistics.median(runs['bridge']))}")

        log(f"2. CreateEndpoint+Join at {SMALL} and {args.endpoints} joined endpoints ...")
        eps = bench_endpoints(plugin, physnet, sandbox, args.endpoints, args.samples)
        state = plugin_status(plugin)
        if eps["leftover"] or state["networks"] or state["endpoints"]:
            raise RuntimeError(f"teardown left links {eps['leftover'][:10]} / state "
                               f"{len(state['networks'])} networks {len(state['endpoints'])} endpoints")
        log("teardown verified: no np* link left, plugin state empty")
        report(args, runs, eps, facts, time.perf_counter() - started)
        ok = True
    except BaseException as exc:  # noqa: BLE001 - report, then tear down
        print(f"\nBENCH FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
        for obj in (plugin, dockerd):
            if obj is not None and not isinstance(exc, KeyboardInterrupt):
                print(f"--- {obj.log} (tail) ---\n{obj.log_tail(25)}", file=sys.stderr)
    finally:
        log("cleaning up ...")
        errors = []
        try:
            if dockerd is not None and dockerd.alive() and plugin is not None and plugin.alive():
                dockerd.remove_all_containers(timeout=60)
                dockerd.remove_networks(timeout=60)
        except Exception as exc:  # noqa: BLE001
            errors.append(f"docker cleanup: {exc}")
        for step in (plugin and plugin.destroy, dockerd and dockerd.destroy, lab.destroy):
            if step:
                try:
                    step()
                except Exception as exc:  # noqa: BLE001
                    errors.append(str(exc))
        errors += cleanup_all()
        shutil.rmtree(workdir, ignore_errors=True)
        left = list_netns(LAB_PREFIX)
        if errors or left or workdir.exists():
            print(f"LAB LEAK: errors={errors} netns={left}", file=sys.stderr)
            ok = False
        else:
            log("cleanup complete: no lab netns, daemon or temp dir left")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

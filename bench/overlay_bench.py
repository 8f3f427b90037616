#!/usr/bin/env python3
"""Overlay side-by-side benchmark on two emulated Docker hosts sharing one etcd (tests/lab/overlay.py).

1. TCP throughput (iperf3, --seconds per run, --rounds runs interleaved): container on host A to
   container on host B over a netplugin overlay (VXLAN), against host A to host B over the underlay
   itself; medians and their ratio. iperf3 runs from the host's binary inside each container's netns
   (nsenter), so the busybox image suffices.
2. Time from `docker run` of a container on host B to the first reply it sends to a container on host
   A that pings its (fixed, --ip) address every 10 ms: from the start of `docker run` and from its
   return, median of --starts runs.

Everything runs in network namespaces the lab creates and is torn down at the end, also on failure or
Ctrl-C. A measurement, not a test: exit 0 unless the bench itself fails.

    .venv/bin/python bench/overlay_bench.py [--seconds 5] [--rounds 3] [--starts 5]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.lab import NSENTER, OWNER_PID, cleanup_all, skip_reason  # noqa: E402
from tests.lab.etcd import skip_reason as etcd_skip_reason  # noqa: E402
from tests.lab.image import build_busybox_tar  # noqa: E402
from tests.lab.overlay import OverlayLab  # noqa: E402

IPERF3 = "/usr/bin/iperf3"
SUBNET = "10.88.0.0/24"
TARGET_IP = "10.88.0.200"


def log(msg: str) -> None:
    print(f"[{time.strftime('%T')}] {msg}", flush=True)


def in_netns(path: str, *argv: str) -> list[str]:
    return [NSENTER, f"--net={path}", *argv]


def iperf(server_ns: str, client_ns: str, server_ip: str, seconds: int) -> float:
    """Gbit/s of one iperf3 TCP run (1 s omitted) from client_ns to server_ns."""
    server = subprocess.Popen(in_netns(server_ns, IPERF3, "-s", "-1", "-B", server_ip),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.3)
        out = subprocess.run(in_netns(client_ns, IPERF3, "-c", server_ip, "-t", str(seconds), "-O", "1", "-J"),
                             capture_output=True, text=True, timeout=seconds + 30)
        if out.returncode != 0:
            raise RuntimeError(f"iperf3 -c {server_ip}: {out.stdout[-300:]} {out.stderr[-300:]}")
        return json.loads(out.stdout)["end"]["sum_received"]["bits_per_second"] / 1e9
    finally:
        try:
            server.wait(timeout=10)  # -1: it exits after serving one client
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def first_reply_after_start(a, b, network: str, round_no: int) -> tuple[float, float]:
    """(s from docker run start, s from its return) to the first echo reply host A's container gets."""
    pinger = subprocess.Popen(
        in_netns(f"/proc/{a.pid('a1')}/ns/net", "ping", "-D", "-n", "-i", "0.01", "-W", "1", "-c", "3000",
                 TARGET_IP), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        time.sleep(0.2)
        t0 = time.time()
        b.run(f"s{round_no}", network, "--ip", TARGET_IP)
        t1 = time.time()
        deadline = time.monotonic() + 10
        for line in pinger.stdout:
            match = re.match(r"^\[(\d+\.\d+)\] \d+ bytes from", line)
            if match:
                first = float(match.group(1))
                return first - t0, first - t1
            if time.monotonic() > deadline:
                break
        raise RuntimeError("no reply within 10 s")
    finally:
        pinger.kill()
        pinger.wait()
        b.docker("rm", "-f", f"s{round_no}", check=False)


def _on_sigterm(*_):
    # pyroute2 forks helpers from this process and ends them with SIGTERM: a helper must die as
    # SIGTERM would kill it, never unwind through main() (whose finally would tear the lab down).
    if os.getpid() != OWNER_PID:
        os._exit(143)
    sys.exit(143)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--starts", type=int, default=5)
    args = parser.parse_args()
    reason = skip_reason() or etcd_skip_reason() or (None if os.access(IPERF3, os.X_OK) else "no iperf3")
    if reason:
        print(f"cannot run here: {reason}", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, _on_sigterm)
    started = time.monotonic()
    load0 = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="overlay-bench-"))
    lab = OverlayLab(work)
    try:
        log("building the lab: etcd, two hosts with dockerd and plugin")
        lab.start(build_busybox_tar(work / "busybox.tar"))
        a, b = lab.hosts
        for host in (a, b):
            host.network("t1", "bench", SUBNET)
        a.run("a1", "t1")
        b.run("b1", "t1")
        if not a.reaches("a1", b.ip("b1")):
            raise RuntimeError("a1 does not reach b1 over the overlay")
        a_ns, b_ns = f"/proc/{a.pid('a1')}/ns/net", f"/proc/{b.pid('b1')}/ns/net"
        runs = {"overlay": [], "underlay": []}
        for r in range(args.rounds):
            runs["overlay"].append(iperf(b_ns, a_ns, b.ip("b1"), args.seconds))
            runs["underlay"].append(iperf(f"/run/netns/{b.ns}", f"/run/netns/{a.ns}", b.underlay_ip, args.seconds))
            log(f"round {r + 1}: overlay {runs['overlay'][-1]:.2f} Gbit/s, underlay {runs['underlay'][-1]:.2f} Gbit/s")
        starts = []
        for n in range(args.starts):
            starts.append(first_reply_after_start(a, b, "t1", n))
            log(f"start {n + 1}: first reply {starts[-1][0] * 1000:.0f} ms after docker run began, "
                f"{starts[-1][1] * 1000:.0f} ms after it returned")
        med = {k: statistics.median(v) for k, v in runs.items()}
        print("\n" + "=" * 96)
        print(f"iperf3 TCP, {args.seconds} s per run after 1 s omitted, {args.rounds} runs each, interleaved")
        for kind in ("overlay", "underlay"):
            print(f"  {kind:<9} median {med[kind]:6.2f} Gbit/s   runs: " + " ".join(f"{v:.2f}" for v in runs[kind]))
        print(f"  ratio overlay / underlay (medians): {med['overlay'] / med['underlay']:.3f}")
        print(f"container start on host B -> first reply to host A (ping every 10 ms), {args.starts} runs:")
        print(f"  from docker run start: median {statistics.median(s[0] for s in starts) * 1000:.0f} ms, "
              f"max {max(s[0] for s in starts) * 1000:.0f} ms")
        print(f"  from docker run return: median {statistics.median(s[1] for s in starts) * 1000:.0f} ms, "
              f"max {max(s[1] for s in starts) * 1000:.0f} ms")
        print(f"machine: {os.cpu_count()} CPUs, kernel {os.uname().release}, load average at start "
              f"{load0[0]:.2f}, at end {os.getloadavg()[0]:.2f}; total {time.monotonic() - started:.0f} s")
        print("=" * 96)
        return 0
    except Exception as exc:  # noqa: BLE001
        print(f"\nBENCH FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
        traceback.print_exc()
        return 1
    finally:
        lab.destroy()
        cleanup_all()
        subprocess.run(["rm", "-rf", str(work)], check=False)


if __name__ == "__main__":
    sys.exit(main())

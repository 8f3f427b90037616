#!/usr/bin/env python3
"""volplugin volume lifecycle latency, LVM thin against Ceph RBD (krbd), side by side in one run (see
bench/README.md). Device-mapper and krbd exist only in the VM lane, so it runs there:

    HOST_LOADAVG="$(cat /proc/loadavg)" bash scripts/vm-lane run --mem 3G --cwd /work/main -- \\
        /work/main/.venv/bin/python bench/volume_latency_bench.py [--runs 5] [--size 10G] [--fs xfs]

One volplugin process serves both backends (`backends = ["lvm", "rbd"]`), as gunicorn does in
production, on a thin pool over a loop-backed sparse file and a throwaway single-node Ceph (one mon,
one memstore OSD: the guest's disk is RAM either way). Each run posts to the plugin socket, as dockerd
does: Create (`size`, `fs`, `backend`), the first Mount, Unmount, Remove, timed one by one; runs
alternate LVM and RBD (after one untimed warm-up of each). Prints medians and maxima per backend and the
ratio LVM / RBD. Exit 0 when measured, 1 when the bench failed, 2 outside the VM lane. Everything is
torn down at the end (plugin, volumes, cluster, thin pool, loop device), also on failure or SIGTERM.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.lab import plugin_post, sigterm_as_interrupt  # noqa: E402
from tests.lab.ceph import destroy_cluster, throwaway_cluster  # noqa: E402
from tests.lab.lvm import thin_pool, toml_text  # noqa: E402
from tests.lab.plugin import Plugin  # noqa: E402

STEPS = ("create", "mount", "unmount", "remove")


def log(msg: str) -> None:
    print(f"[{time.strftime('%T')}] {msg}", flush=True)


def ms(x: float) -> str:
    return f"{x * 1000:.0f} ms"


def in_vm_lane() -> bool:
    return os.path.isdir("/sys/module/dm_thin_pool") or (
        os.environ.get("NETPLUGIN_VM_LANE") == "1" and os.path.isfile("/run/vm-lane/vm.conf"))


def write_config(path: Path, pool, cluster, state_dir: Path) -> None:
    config = pool.config(state_dir)
    config.update(backends=["lvm", "rbd"], workers=2)
    config["volume"].update(size="10G", fs="xfs")
    config["rbd"] = {"conf": cluster.conf_path, "pool": cluster.pool, "trash_retention": 0.0}
    path.write_text(toml_text(config))


def one_run(plugin: Plugin, backend: str, size: str, fs: str, n: int) -> dict:
    name = f"b{backend}{n}x{os.urandom(2).hex()}"
    bodies = {"create": {"Name": name, "Opts": {"size": size, "fs": fs, "backend": backend}},
              "mount": {"Name": name, "ID": "bench"}, "unmount": {"Name": name, "ID": "bench"},
              "remove": {"Name": name}}
    times = {}
    for step in STEPS:
        started = time.perf_counter()
        status, reply = plugin_post(plugin.socket, f"/VolumeDriver.{step.capitalize()}", bodies[step],
                                    timeout=300)
        times[step] = time.perf_counter() - started
        if status != 200:
            raise RuntimeError(f"{backend} {step} of {name}: {status} {reply}")
    times["create+mount"] = times["create"] + times["mount"]
    return times


def report(results: dict, args, facts: dict) -> None:
    keys = ("create", "mount", "create+mount", "unmount", "remove")
    print()
    print(f"volume lifecycle, {args.size} {args.fs}, {args.runs} runs per backend (median / max)")
    print(f"{'step':14}{'lvm (thin)':>22}{'rbd (krbd)':>22}{'lvm / rbd':>12}")
    for key in keys:
        lvm = [r[key] for r in results["lvm"]]
        rbd = [r[key] for r in results["rbd"]]
        ratio = statistics.median(lvm) / statistics.median(rbd)
        print(f"{key:14}{ms(statistics.median(lvm)) + ' / ' + ms(max(lvm)):>22}"
              f"{ms(statistics.median(rbd)) + ' / ' + ms(max(rbd)):>22}{ratio:>12.2f}")
    print()
    for key, value in facts.items():
        print(f"{key:22}{value}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--size", default="10G")
    parser.add_argument("--fs", default="xfs", choices=("xfs", "ext4"))
    args = parser.parse_args()
    if not in_vm_lane():
        print("volume_latency_bench: needs device-mapper and krbd: run it in the VM lane:\n"
              '  HOST_LOADAVG="$(cat /proc/loadavg)" bash scripts/vm-lane run --mem 3G --cwd /work/main -- '
              "/work/main/.venv/bin/python bench/volume_latency_bench.py", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, sigterm_as_interrupt)
    subprocess.run(["modprobe", "-a", "dm_thin_pool", "rbd"], check=True, timeout=60)
    workdir = Path(tempfile.mkdtemp(prefix="volbench-"))
    started = time.monotonic()
    plugin = None
    try:
        with contextlib.ExitStack() as teardown:  # in reverse: plugin, cluster, thin pool
            pool = teardown.enter_context(thin_pool(workdir, size=24 * 2**30))
            cluster = throwaway_cluster(workdir, objectstore="memstore", store_gib=4)
            teardown.callback(destroy_cluster, cluster)
            log(f"thin pool {pool.vg}/{pool.pool} and Ceph ready")
            config = workdir / "volplugin.toml"
            write_config(config, pool, cluster, workdir / "plugin" / "state")
            plugin = Plugin(None, workdir / "plugin", name=f"vpbench{os.urandom(3).hex()}",
                            command=[sys.executable, "-m", "volplugin"], extra_args=("--config", str(config)))
            teardown.callback(plugin.destroy)
            plugin.start(timeout=300)
            for backend in ("lvm", "rbd"):  # warm-up: first connections, first mkfs code paths
                one_run(plugin, backend, args.size, args.fs, 0)
            results = {"lvm": [], "rbd": []}
            for n in range(1, args.runs + 1):
                order = ("lvm", "rbd") if n % 2 else ("rbd", "lvm")
                for backend in order:
                    results[backend].append(one_run(plugin, backend, args.size, args.fs, n))
                log(f"run {n}: create+mount lvm {ms(results['lvm'][-1]['create+mount'])}, "
                    f"rbd {ms(results['rbd'][-1]['create+mount'])}")
            attach = "krbd" if "via krbd" in plugin.log.read_text() else "not krbd: see the plugin log"
            facts = {"rbd attach method": attach, "kernel": platform.release(), "cpus": os.cpu_count(),
                     "guest loadavg": open("/proc/loadavg").read().strip(),
                     "host loadavg": os.environ.get("HOST_LOADAVG", "(not given)"),
                     "wall time": f"{time.monotonic() - started:.0f} s"}
            report(results, args, facts)
    except KeyboardInterrupt:
        log("interrupted: torn down")
        return 1
    except Exception as exc:  # noqa: BLE001 - a failed bench reports (after the teardown above)
        log(f"bench failed: {exc}")
        if plugin is not None:
            print(plugin.log_tail(40), file=sys.stderr)
        return 1
    finally:
        subprocess.run(["rm", "-rf", str(workdir)], check=False, timeout=120)
    return 0


if __name__ == "__main__":
    sys.exit(main())

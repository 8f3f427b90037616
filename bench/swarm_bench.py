#!/usr/bin/env python3
"""Swarm side-by-side benchmark on a single-node swarm (tests/lab/swarm.py): how long services take on a
netplugin network (the managed plugin, scope global, static mode on the emulated physical network)
against Docker's own overlay network, in one run, interleaved round by round:

1. `docker service create --replicas N` until all N tasks run,
2. `docker service scale` to 2N until all run,
3. `docker service update --force` (start-first) until the update completes,
4. `docker service rm` until the containers are gone.

Medians per phase and network, and their ratio (netplugin / overlay). Everything runs in network namespaces
the lab creates and is torn down at the end, also on failure or Ctrl-C. A measurement, not a test.

    .venv/bin/python bench/swarm_bench.py [--replicas 4] [--rounds 3]
"""
from __future__ import annotations

import argparse
import secrets
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.lab import cleanup_all, remove_tree, sigterm_as_interrupt, skip_reason  # noqa: E402
from tests.lab.dockerd import Dockerd  # noqa: E402
from tests.lab.image import IMAGE, build_busybox_tar  # noqa: E402
from tests.lab.managed import ManagedPlugin, build_plugins, build_skip_reason  # noqa: E402
from tests.lab.netns import Lab, build_physnet  # noqa: E402
from tests.lab.swarm import Swarm, teardown  # noqa: E402

PHASES = ("create", "scale", "update", "rm")


def log(msg: str) -> None:
    print(f"[{time.strftime('%T')}] {msg}", flush=True)


def timed(fn) -> float:
    start = time.monotonic()
    fn()
    return time.monotonic() - start


def one_round(swarm: Swarm, network: str, replicas: int) -> dict[str, float]:
    docker, service = swarm.docker, f"b{secrets.token_hex(3)}"
    out = {}
    out["create"] = timed(lambda: (
        docker("service", "create", "--detach", "--no-resolve-image", "--name", service, "--network", network,
               "--replicas", str(replicas), "--update-order", "start-first", "--update-parallelism", "0",
               "--init",  # sleep as PID 1 ignores SIGTERM: without an init every stop waits 10 s
               IMAGE, "sleep", "3600"),
        swarm.wait_running(service, replicas)))
    out["scale"] = timed(lambda: (docker("service", "scale", "--detach", f"{service}={2 * replicas}"),
                                  swarm.wait_running(service, 2 * replicas)))
    out["update"] = timed(lambda: (docker("service", "update", "--detach", "--force", service),
                                   swarm.wait_update(service)))
    out["rm"] = timed(lambda: (docker("service", "rm", service), swarm.wait_gone(service)))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    for reason in (skip_reason(), build_skip_reason()):
        if reason:
            print(f"cannot run: {reason}", file=sys.stderr)
            return 2
    signal.signal(signal.SIGTERM, sigterm_as_interrupt)
    work = Path(tempfile.mkdtemp(prefix="swarm-bench-", dir="/var/tmp"))
    lab, daemon, plugin, swarm = Lab(), None, None, None
    try:
        log("building the managed netplugin (cached base: seconds)")
        build = build_plugins(work / "build", "netplugin")
        physnet = build_physnet(lab)
        daemon = Dockerd(physnet.hosta, log_path=work / "dockerd.log", live_restore=False).start()
        daemon.import_image(build_busybox_tar(work / "busybox.tar"), IMAGE)
        swarm = Swarm(daemon, lab, physnet.hosta).init()
        plugin = ManagedPlugin(daemon, f"benchnp{secrets.token_hex(2)}:v1").create(build["netplugin"])
        (work / "state").mkdir()
        plugin.set(f"state.source={work / 'state'}", "NETPLUGIN_CLUSTER_SCOPE=global", "NETPLUGIN_WORKERS=2")
        plugin.enable()
        swarm.wait_node_plugins({("Network", plugin.name)})
        daemon.docker("network", "create", "-d", plugin.name, "--ipam-driver", plugin.name, "--scope", "swarm",
                      "--subnet", physnet.subnet, "--gateway", physnet.gateway, "-o", f"parent={physnet.parent}",
                      "npnet")
        daemon.docker("network", "create", "-d", "overlay", "--subnet", "10.99.0.0/24", "ovnet")
        results: dict[str, list[dict]] = {"npnet": [], "ovnet": []}
        for r in range(args.rounds):
            for network in ("npnet", "ovnet") if r % 2 == 0 else ("ovnet", "npnet"):
                results[network].append(one_round(swarm, network, args.replicas))
                log(f"round {r + 1} {network}: " + ", ".join(f"{k} {v:.2f}s" for k, v in results[network][-1].items()))
        print(f"\nsingle-node swarm, {args.replicas} -> {2 * args.replicas} replicas, median of {args.rounds} rounds")
        print(f"{'phase':8} {'netplugin':>10} {'overlay':>10} {'ratio':>7}")
        for phase in PHASES:
            np_s = statistics.median(x[phase] for x in results["npnet"])
            ov_s = statistics.median(x[phase] for x in results["ovnet"])
            print(f"{phase:8} {np_s:9.2f}s {ov_s:9.2f}s {np_s / ov_s:7.2f}")
        return 0
    finally:
        teardown(daemon, swarm, [plugin] if plugin else [])
        lab.destroy()
        cleanup_all()
        remove_tree(work)


if __name__ == "__main__":
    sys.exit(main())

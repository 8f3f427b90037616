#!/usr/bin/env python3
"""volplugin measurements on a throwaway single-node Ceph, in one run (see bench/README.md).

1. Create + first Mount latency of a 10 GiB volume (xfs and ext4, interleaved) posted to the plugin
   socket as dockerd posts them, then Unmount and Remove: median and max over N runs (default 5).
2. pgbench TPS of the PostgreSQL test image on a volplugin volume versus on a host directory, in a test
   dockerd (own netns), A B A B; median per kind and the ratio volplugin / host dir.

The numbers belong to the attach path the plugin used (printed: here rbd-fuse + loop, since this kernel
has neither krbd nor nbd). Everything is torn down at the end, also on failure, Ctrl-C or SIGTERM.
Exit 0 on a completed measurement, 1 if the bench failed or left something behind.

    /work/main/.venv/bin/python bench/volplugin_bench.py [--runs 5] [--pgbench-seconds 20] [--keep-logs DIR]
"""
from __future__ import annotations

import argparse
import os
import platform
import re
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

from tests.lab import (LAB_PREFIX, cleanup_all, end_processes, mounts_under, pids_with_arg,  # noqa: E402
                       plugin_post, remove_tree, sh, sigterm_as_interrupt, skip_reason)
from tests.lab.ceph import destroy_cluster, skip_reason as ceph_skip_reason, throwaway_cluster  # noqa: E402
from tests.lab.dockerd import Dockerd  # noqa: E402
from tests.lab.netns import Lab, list_netns  # noqa: E402
from tests.lab.pgimage import (MOUNT_POINT, SOCKET_DIR, build_postgres_tar, import_postgres,  # noqa: E402
                               prepare_volume_dir, psql, skip_reason as pg_skip_reason, wait_pg_ready)
from tests.lab.plugin import Plugin  # noqa: E402
from tests.lab.rbd import loops_under  # noqa: E402

SIZE, FILESYSTEMS = "10G", ("xfs", "ext4")
LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) \d+ (\w+) [\w.]+: (.*)$")
LABELS = {r"^created image": "'created image'", r"attached as \S+ via": "'attached as ... via'",
          r"^volume \S+ created \(": "'volume created'", r"moved to the trash": "'moved to the trash'",
          r"unmounted and detached": "'unmounted and detached'", r"attached at": "'attached at ... mounted'"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%T')}] {msg}", flush=True)


def s(x: float) -> str:
    return f"{x:.2f} s" if x >= 1 else f"{x * 1000:.0f} ms"


def step_name(msg: str) -> str:
    """A log line as a step label: commands by name, the plugin's own lines without names/numbers."""
    m = re.match(r"(ran|spawned) \['([^']+)'(?:, '([^']+)')?", msg)
    if m:
        argv0 = os.path.basename(m.group(2))
        return f"{m.group(1)} {argv0}" + (f" {m.group(3)}" if argv0 in ("losetup", "rbd") else "")
    label = next((v for k, v in LABELS.items() if re.search(k, msg)), None)
    return label or "'" + " ".join(w for w in msg.split()[:4] if not re.search(r"[/\d]", w)) + "'"


class Api:
    """POSTs to the plugin socket as dockerd does; each labelled call's plugin log lines become a
    profile: the time between consecutive lines, charged to the line that ends each gap (for a
    ``ran [cmd ...]`` line that is mostly the command's own run time)."""

    def __init__(self, plugin: Plugin):
        self.plugin = plugin
        self.profiles: dict[str, list[dict[str, float]]] = {}  # "Create xfs" -> per run {step: s}

    def __call__(self, endpoint: str, body: dict, label: str | None = None) -> tuple[float, dict]:
        pos, t0 = self.plugin.log.stat().st_size, time.time()
        status, reply = plugin_post(self.plugin.socket, endpoint, body, timeout=180)
        t1 = time.time()
        if status != 200 or reply.get("Err"):
            raise RuntimeError(f"{endpoint} {body} answered {status}: {reply}")
        if label:
            steps, last = {}, t0
            for ts, _, msg in read_log(self.plugin.log, pos):
                steps[step_name(msg)] = steps.get(step_name(msg), 0.0) + max(0.0, ts - last)
                last = max(last, ts)
            steps["(after the last log line)"] = max(0.0, t1 - last)
            self.profiles.setdefault(label, []).append(steps)
        return t1 - t0, reply


def read_log(path: Path, pos: int = 0) -> list[tuple[float, str, str]]:
    """(epoch seconds, level, message) of the plugin log's lines from byte ``pos`` on."""
    with open(path, "rb") as f:
        f.seek(pos)
        lines = f.read().decode(errors="replace").splitlines()
    return [(time.mktime(time.strptime(m[1], "%Y-%m-%d %H:%M:%S")) + int(m[2]) / 1000, m[3], m[4])
            for m in map(LOG_LINE.match, lines) if m]


def dsync_probe(directory: Path, seconds: float = 2.0) -> float:
    """4 KiB O_DSYNC writes for ``seconds`` (what a WAL commit does): MB/s."""
    path = directory / f".dsync-probe-{secrets.token_hex(4)}"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_DSYNC, 0o600)
    block, n, t0 = b"\0" * 4096, 0, time.perf_counter()
    try:
        while time.perf_counter() - t0 < seconds:
            n += os.write(fd, block) // 4096
    finally:
        os.close(fd)
        path.unlink()
    return n * 4096 / (time.perf_counter() - t0) / 1e6


def cpu_ticks(groups: dict[str, list[int]]) -> dict[str, float]:
    """CPU seconds used so far: the whole machine ("busy", "all" from /proc/stat) and each group."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:9]]
    hz = os.sysconf("SC_CLK_TCK")
    out = {"all": sum(fields) / hz, "busy": (sum(fields) - fields[3] - fields[4]) / hz}
    for name, pids in groups.items():
        out[name] = 0.0
        for pid in pids:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    out[name] += sum(int(x) for x in f.read().rsplit(")", 1)[1].split()[11:13]) / hz
            except (OSError, IndexError):
                pass
    return out


# --- 1. Create + first Mount, Unmount, Remove through the socket ----------------------------------

def bench_lifecycle(api: Api, runs: int, live: dict) -> dict:
    res: dict = {fs: {k: [] for k in ("create", "mount", "unmount", "remove")} for fs in FILESYSTEMS}
    res["warmup"], res["dsync"] = {}, {}
    for i in range(-1, runs):  # -1: one warm-up cycle per filesystem (fresh workers), reported apart
        for fs in (FILESYSTEMS if i % 2 == 0 else FILESYSTEMS[::-1]):
            name, caller, label = f"vb{fs}{i + 1}{secrets.token_hex(3)}", secrets.token_hex(32), i >= 0
            live[name] = None
            t_c, _ = api("/VolumeDriver.Create", {"Name": name, "Opts": {"size": SIZE, "fs": fs}},
                         label and f"Create {fs}")
            t_m, reply = api("/VolumeDriver.Mount", {"Name": name, "ID": caller}, label and f"Mount {fs}")
            live[name] = caller
            mnt = Path(reply["Mountpoint"])
            if (mnt / "pgdata").stat().st_uid != 999 or \
                    sh(["findmnt", "-n", "-o", "FSTYPE", str(mnt)]).stdout.strip() != fs:
                raise RuntimeError(f"{name}: {mnt} is not a {fs} mount with pgdata owned by 999")
            if i == 0:
                res["dsync"][fs] = dsync_probe(mnt)
            t_u, _ = api("/VolumeDriver.Unmount", {"Name": name, "ID": caller}, label and f"Unmount {fs}")
            live[name] = None
            t_r, _ = api("/VolumeDriver.Remove", {"Name": name}, label and f"Remove {fs}")
            del live[name]
            if i < 0:
                res["warmup"][fs] = (t_c, t_m)
            else:
                for key, val in zip(("create", "mount", "unmount", "remove"), (t_c, t_m, t_u, t_r)):
                    res[fs][key].append(val)
        log("   " + ", ".join(f"{fs} Create {s(res[fs]['create'][-1])} Mount {s(res[fs]['mount'][-1])}"
                              for fs in FILESYSTEMS) if i >= 0 else "   warm-up: " + ", ".join(
            f"{fs} Create {s(c)} Mount {s(m)}" for fs, (c, m) in res["warmup"].items()))
    return res


# --- 2. pgbench: volplugin volume vs host directory ----------------------------------------------

def pgbench(d, container: str, *args: str, timeout: float) -> str:
    return d("exec", container, "pgbench", "-h", SOCKET_DIR, "-U", "postgres", *args, "postgres",
             timeout=timeout).stdout


def bench_pgbench(dockerd: Dockerd, plugin: Plugin, cluster, image: str, hostdir: Path, seconds: int) -> dict:
    d = dockerd.docker
    vol = f"vbpg{secrets.token_hex(3)}"
    d("volume", "create", "-d", plugin.name, "-o", f"size={SIZE}", "-o", "fs=xfs", vol, timeout=180)
    kinds = {"volplugin": vol, "hostdir": str(hostdir)}
    res: dict = {k: {"tps": [], "lat": [], "ckpt": [], "cpu": []} for k in kinds}
    for kind, source in kinds.items():
        t0, pos = time.perf_counter(), plugin.log.stat().st_size
        d("run", "-d", "--name", f"pg-{kind}", "--network", "none", "--stop-signal", "SIGINT",
          "-v", f"{source}:{MOUNT_POINT}", image, timeout=180)
        wait_pg_ready(d, f"pg-{kind}", timeout=120)
        res[kind]["start"], t0 = time.perf_counter() - t0, time.perf_counter()
        res[kind]["calls"] = " ".join(m.split()[1].split(".")[-1] + f"({m.split()[-1]})" for _, _, m
                                      in read_log(plugin.log, pos) if m.startswith("POST /VolumeDriver."))
        pgbench(d, f"pg-{kind}", "-i", "-s", "5", "-q", timeout=600)
        psql(d, f"pg-{kind}", "CHECKPOINT", timeout=300)
        res[kind]["init"] = time.perf_counter() - t0
        log(f"   {kind}: docker run + initdb + ready {s(res[kind]['start'])}, pgbench -i {s(res[kind]['init'])}")
    groups = {"ceph-osd": [cluster.daemon_pids()["osd"]],
              "rbd-fuse": [r.pid for r in pids_with_arg(f"{plugin.state_dir}/rbd/fuse/")]}
    for rnd in range(2):  # A B A B
        for kind in kinds:
            c0 = cpu_ticks(groups)
            out = pgbench(d, f"pg-{kind}", "-T", str(seconds), "-c", "4", "-j", "2", timeout=seconds + 300)
            c1 = cpu_ticks(groups)
            tps = re.search(r"tps = ([\d.]+) \(without initial connection time\)", out)
            lat = re.search(r"latency average = ([\d.]+) ms", out)
            if not tps or not lat:
                raise RuntimeError(f"unexpected pgbench output:\n{out}")
            wall = c1["all"] - c0["all"]  # CPU seconds of all cores together
            res[kind]["cpu"].append({k: (c1[k] - c0[k]) / wall * (os.cpu_count() or 1) for k in c1 if k != "all"})
            res[kind]["tps"].append(float(tps[1]))
            res[kind]["lat"].append(float(lat[1]))
            t0 = time.perf_counter()  # flush what the run dirtied, so it doesn't land in the next run
            psql(d, f"pg-{kind}", "CHECKPOINT", timeout=300)
            res[kind]["ckpt"].append(time.perf_counter() - t0)
            log(f"   round {rnd + 1} {kind:<9}: {float(tps[1]):8.1f} tps, latency avg {lat[1]} ms, "
                f"CHECKPOINT after it {s(res[kind]['ckpt'][-1])}")
    d("rm", "-f", "pg-volplugin", "pg-hostdir", timeout=120)
    d("volume", "rm", vol, timeout=180)
    res["dsync_host"] = dsync_probe(hostdir)
    return res


# --- report --------------------------------------------------------------------------------------

def machine_facts(plugin: Plugin, dockerd: Dockerd, workdir: Path) -> dict:
    def out(argv):
        return subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout.strip()
    methods = set(re.findall(r"attached as \S+ via (\w+)", plugin.log.read_text(errors="replace")))
    why = [f"krbd {'present' if os.path.isdir('/sys/bus/rbd') else 'absent (no /sys/bus/rbd)'}",
           f"nbd {'present' if os.path.isdir('/sys/module/nbd') else 'absent (no nbd module)'}"]
    fs = " ".join(out(["findmnt", "-n", "-o", "FSTYPE,SOURCE", "-T", str(workdir)]).split())
    ceph = re.sub(r" \(\w+\)", "", out(["ceph-osd", "--version"]))  # without the commit hash
    docker = dockerd.docker("version", "--format", "{{.Server.Version}}").stdout.strip()
    return {"method": "/".join(sorted(methods)) or "?", "why": ", ".join(why), "disk": fs or "?",
            "lines": [f"nproc {os.cpu_count()}, kernel {platform.release()}, {ceph}",
                      f"docker engine {docker}, {out(['/usr/lib/postgresql/15/bin/postgres', '--version'])}",
                      f"Ceph: 1 mon + 1 bluestore OSD (sparse file on {fs}), pool size 1, 127.0.0.1; "
                      "plugin: 2 gunicorn workers, log level debug"]}


def report(args, lc: dict, pg: dict, api: Api, facts: dict, plugin: Plugin, total: float) -> None:
    w, method = 108, facts["method"]
    print("\n" + "=" * w)
    print(f"1. {SIZE} volume, Create/Mount/Unmount/Remove posted to the plugin socket; {args.runs} runs per fs")
    print(f"   attach path: {method} ({facts['why']})")
    print(f"{'':<36}{'median':>10}{'max':>10}{'min':>10}")
    for fs in FILESYSTEMS:
        r = lc[fs]
        both = [c + m for c, m in zip(r["create"], r["mount"])]
        for name, vals in (("Create", r["create"]), ("first Mount", r["mount"]), ("Create + first Mount", both),
                           ("Unmount (last caller)", r["unmount"]), ("Remove (after Unmount)", r["remove"])):
            print(f"  {fs + ': ' + name:<34}{s(statistics.median(vals)):>10}{s(max(vals)):>10}{s(min(vals)):>10}")
        print(f"  {fs}: warm-up cycle (not above): Create {s(lc['warmup'][fs][0])}, Mount {s(lc['warmup'][fs][1])}")
    print("-" * w)
    print("where the time goes (median per run, from the plugin's debug log: time up to each log line)")
    for label, runs in api.profiles.items():
        keys = {k for r in runs for k in r}
        med = sorted(((statistics.median(r.get(k, 0.0) for r in runs), k) for k in keys), reverse=True)
        print(f"  {label:<13}" + "; ".join(f"{k} {s(v)}" for v, k in med[:5] if v >= 0.005))
    print("-" * w)
    print(f"2. pgbench -T {args.pgbench_seconds} -c 4 -j 2, scale 5, over the unix socket, fsync on; A B A B")
    tps = {k: statistics.median(pg[k]["tps"]) for k in ("volplugin", "hostdir")}
    for kind, what in (("volplugin", f"volplugin volume (xfs, {method} + loop)"),
                       ("hostdir", f"host directory ({facts['disk']})")):
        r = pg[kind]
        cpu = {k: statistics.median(c[k] for c in r["cpu"]) for k in r["cpu"][0]}
        print(f"  {what:<42} median {tps[kind]:8.1f} tps  (runs {' '.join(f'{x:.1f}' for x in r['tps'])}; "
              f"latency avg {statistics.median(r['lat']):.2f} ms)")
        print(f"     CPU busy (cores of {os.cpu_count()}): machine {cpu['busy']:.2f}, ceph-osd {cpu['ceph-osd']:.2f}, "
              f"rbd-fuse {cpu['rbd-fuse']:.2f}; docker run+initdb {s(r['start'])}, pgbench -i {s(r['init'])}, "
              f"CHECKPOINT after runs {' '.join(s(x) for x in r['ckpt'])}")
    print(f"  ratio volplugin / hostdir {tps['volplugin'] / tps['hostdir']:.3f}   (for the {method} attach path "
          "only; the krbd path is measured in the full-kernel VM lane)")
    print("  4 KiB O_DSYNC writes, 2 s each: " + ", ".join(f"{fs} volume {v:.2f} MB/s" for fs, v in
                                                          lc["dsync"].items()) + f", host dir {pg['dsync_host']:.2f} MB/s")
    print(f"  the plugin calls of `docker run -v VOLUME` (container create + start): {pg['volplugin']['calls']}")
    print("-" * w)
    warns = [(lvl, msg) for _, lvl, msg in read_log(plugin.log) if lvl in ("WARNING", "ERROR", "CRITICAL")]
    print(f"plugin log: {len(warns)} warning/error lines" + "".join(f"\n  {lvl} {msg[:w - 12]}" for lvl, msg in warns[:5]))
    for line in facts["lines"]:
        print(f"machine: {line}")
    load0, end = args.load0, os.getloadavg()
    print(f"machine: load average at start {'/'.join(f'{x:.2f}' for x in load0)}, at end "
          f"{'/'.join(f'{x:.2f}' for x in end)}" + ("  <- busy before the start: expect noise"
                                                     if load0[0] > 0.5 * (os.cpu_count() or 1) else ""))
    print(f"total bench runtime {total:.0f} s")
    print("=" * w)


# --- teardown and main ---------------------------------------------------------------------------

def teardown(workdir: Path, hostdir, plugin, dockerd, cluster, lab: Lab, live: dict) -> list[str]:
    errors = []

    def step(what, fn, *a):
        try:
            fn(*a)
        except Exception as exc:  # noqa: BLE001 - keep tearing down
            errors.append(f"{what}: {exc}")
    if plugin is not None and plugin.alive():  # part 1's volumes first: docker lists them too
        for name, caller in list(live.items()):
            if caller:
                step(f"Unmount {name}", plugin_post, plugin.socket, "/VolumeDriver.Unmount",
                     {"Name": name, "ID": caller}, 180)
            step(f"Remove {name}", plugin_post, plugin.socket, "/VolumeDriver.Remove", {"Name": name}, 180)
    if dockerd is not None and dockerd.alive() and plugin is not None and plugin.alive():
        step("docker rm", dockerd.remove_all_containers, 120)  # -> Unmount through the plugin
        for vol in dockerd.docker("volume", "ls", "-q", check=False).stdout.split():
            step(f"docker volume rm {vol}", dockerd.docker, "volume", "rm", vol)
    for obj in (o for o in (plugin, dockerd) if o is not None):
        step(f"destroy {type(obj).__name__}", obj.destroy)
    if plugin is not None:  # what the plugin left behind: fs mounts, loop devices, FUSE mounts, rbd-fuse
        state = str(plugin.state_dir)
        fuse = f"{state}/rbd/fuse/"
        mnts = mounts_under(Path(state))
        for mnt in [m for m in mnts if not m.startswith(fuse)] + [m for m in mnts if m.startswith(fuse)]:
            sh(["umount", "-l", mnt], check=False, timeout=30)
            errors.append(f"plugin left a mount: {mnt}")
        for dev in loops_under(Path(state)):
            sh(["losetup", "--detach", dev], check=False, timeout=30)
            errors.append(f"plugin left a loop device: {dev}")
        procs = pids_with_arg(state)
        if procs:
            errors.append(f"plugin left processes: {procs}")
            end_processes(procs, timeout=10)
    if cluster is not None:
        step("destroy cluster", destroy_cluster, cluster)
    step("destroy netns", lab.destroy)
    errors += cleanup_all()
    for path in (p for p in (workdir, hostdir) if p is not None):
        remove_tree(path)
    return errors


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5, help="Create+Mount runs per filesystem (default 5)")
    ap.add_argument("--pgbench-seconds", type=int, default=20, help="pgbench -T per run (default 20)")
    ap.add_argument("--keep-logs", type=Path, help="copy the plugin and dockerd logs to this directory")
    args = ap.parse_args()
    if not 1 <= args.runs <= 100 or not 1 <= args.pgbench_seconds <= 3600:
        ap.error("need 1 <= --runs <= 100 and 1 <= --pgbench-seconds <= 3600")
    for reason in (skip_reason(), ceph_skip_reason(), pg_skip_reason()):
        if reason:
            print(f"cannot run here: {reason}", file=sys.stderr)
            return 2
    signal.signal(signal.SIGTERM, sigterm_as_interrupt)
    started, args.load0 = time.perf_counter(), os.getloadavg()
    workdir = Path(tempfile.mkdtemp(prefix=LAB_PREFIX + "vbench-", dir="/tmp"))
    hostdir = plugin = dockerd = cluster = None
    lab, live, ok = Lab(), {}, False
    try:
        log("starting a throwaway Ceph cluster, the plugin, a test dockerd in its own netns ...")
        cluster = throwaway_cluster(workdir)
        config = workdir / "volplugin.toml"
        config.write_text(f'host_id = "benchhost"\n[rbd]\nconf = "{cluster.conf_path}"\npool = "{cluster.pool}"\n'
                          'fence_grace = 2.0\nconnect_timeout = 5.0\nop_timeout = 15.0\n')
        plugin = Plugin(None, workdir / "volplugin", name=f"vpbench{secrets.token_hex(3)}",
                        command=[sys.executable, "-m", "volplugin"], extra_args=("--config", str(config)))
        plugin.start(timeout=60)
        dockerd = Dockerd(lab.netns("vbench"), log_path=workdir / "dockerd.log")
        dockerd.start()
        image = import_postgres(dockerd, build_postgres_tar(workdir / "postgres.tar"))
        api = Api(plugin)

        log(f"1. Create + first Mount of {SIZE} volumes, {args.runs} runs x {FILESYSTEMS} (+1 warm-up) ...")
        lc = bench_lifecycle(api, args.runs, live)
        facts = machine_facts(plugin, dockerd, workdir)
        log(f"   attach method: {facts['method']} ({facts['why']})")

        log(f"2. pgbench: volplugin volume vs host directory, A B A B, {args.pgbench_seconds} s each ...")
        hostdir = prepare_volume_dir(Path(tempfile.mkdtemp(prefix=LAB_PREFIX + "vbench-pg-", dir="/tmp")))
        pg = bench_pgbench(dockerd, plugin, cluster, image, hostdir, args.pgbench_seconds)
        report(args, lc, pg, api, facts, plugin, time.perf_counter() - started)
        ok = True
    except BaseException as exc:  # noqa: BLE001 - report, then tear down
        print(f"\nBENCH FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
        for obj in (plugin, dockerd):
            if obj is not None and not isinstance(exc, KeyboardInterrupt):
                print(f"--- {obj.log} (tail) ---\n{obj.log_tail(25)}", file=sys.stderr)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # no second interrupt in the middle of teardown
        if args.keep_logs:
            args.keep_logs.mkdir(parents=True, exist_ok=True)
            for obj in (o for o in (plugin, dockerd) if o is not None and o.log.is_file()):
                shutil.copy(obj.log, args.keep_logs / f"{type(obj).__name__.lower()}.log")
        log("cleaning up ...")
        errors = teardown(workdir, hostdir, plugin, dockerd, cluster, lab, live)
        left = [str(p) for p in (workdir, hostdir) if p is not None and p.exists()] + list_netns(LAB_PREFIX)
        left += [f"pid {r.pid}" for r in pids_with_arg(str(workdir))]
        if plugin is not None and plugin.socket.exists():
            left.append(str(plugin.socket))
        if errors or left:
            print(f"LEAK OR TEARDOWN ERROR: errors={errors} left={left}", file=sys.stderr)
            ok = False
        else:
            log("cleanup complete: no container, volume, mount, loop device, rbd-fuse, Ceph daemon, "
                "dockerd, netns, socket or temp dir left")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

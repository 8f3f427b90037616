"""volplugin's LVM thin backend end to end through a real dockerd inside the VM lane (device-mapper exists
only there): PostgreSQL initdb's and runs on a thin LV, a snapshot taken while it runs is crash-consistent,
its rows survive an unclean replacement of the container (WAL replay), and the clone of the snapshot starts
as a second database with the rows as of the snapshot only.

One loop-backed volume group + thin pool (tests/lab/lvm.py), one dockerd in the guest's initial namespace
(``--bridge=none``; containers run with ``--network none``, no netplugin) and one volume plugin process
(``python -m volplugin serve``, LVM backend only, dmeventd monitoring off) for the module. The plugin and
dockerd share the root mount namespace. Phase timings go to stderr (pytest -s or the report's captured
stderr). Run it with:

    bash scripts/test-vm tests/vm/test_lvm_e2e.py
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time

import pytest

from tests.lab import REPO_ROOT
from tests.lab import skip_reason as lab_skip_reason
from tests.lab.dockerd import Dockerd
from tests.lab.lvm import thin_pool
from tests.lab.pgimage import (MOUNT_POINT, PGDATA, POSTGRES_IMAGE, build_postgres_tar, import_changes, psql,
                               wait_pg_ready)
from tests.lab.pgimage import skip_reason as pg_skip_reason
from tests.lab.plugin import Plugin
from tests.lab.stack import DOCKER_TIMEOUT, DOCKERD_START_TIMEOUT, PLUGIN_START_TIMEOUT

pytestmark = pytest.mark.vm

ADMIN_TIMEOUT = 180  # a Python start-up of the admin CLI alone takes seconds under TCG
PG_READY_TIMEOUT = 240  # initdb + start, or WAL replay, under TCG


def _phase(what: str, since: float) -> float:
    now = time.monotonic()
    print(f"lvm-e2e: {what}: {now - since:.1f} s", file=sys.stderr)
    return now


@pytest.fixture(scope="module")
def pool(vm, tmp_path_factory):
    reason = lab_skip_reason() or pg_skip_reason()
    if reason:
        pytest.skip(f"e2e lab unavailable: {reason}")
    vm.modprobe("dm_thin_pool")
    t = time.monotonic()
    with thin_pool(tmp_path_factory.mktemp("lvm")) as made:
        _phase("thin pool ready", t)
        yield made


@pytest.fixture(scope="module")
def dockerd(vm, tmp_path_factory):
    """A dockerd in the guest's initial namespace with the PostgreSQL test image imported."""
    t = time.monotonic()
    tar = build_postgres_tar(tmp_path_factory.mktemp("pgimage") / "postgres.tar")
    t = _phase(f"postgres image tar built ({tar.stat().st_size / 1e6:.0f} MB)", t)
    daemon = Dockerd(None, log_path=tmp_path_factory.mktemp("dockerd") / "dockerd.log")
    try:
        daemon.start(timeout=DOCKERD_START_TIMEOUT)
        t = _phase("dockerd started", t)
        daemon.docker("import", *import_changes(), str(tar), POSTGRES_IMAGE, timeout=DOCKER_TIMEOUT)
        tar.unlink()  # the guest's /tmp is RAM
        _phase("postgres image imported", t)
        yield daemon
    finally:
        daemon.destroy()


@pytest.fixture(scope="module")
def volplugin(pool, dockerd, tmp_path_factory):
    """The volume plugin as a real process serving a unique driver name, LVM backend on ``pool`` only.
    Afterwards: containers, then the plugin's volumes go while it still answers; then it stops (the
    pool fixture, set up first, is torn down last and unmounts whatever is left on its LVs)."""
    workdir = tmp_path_factory.mktemp("volplugin")
    config = workdir / "volplugin.toml"
    p = Plugin(None, workdir, name=f"vptest{os.urandom(3).hex()}", command=[sys.executable, "-m", "volplugin"],
               extra_args=("--config", str(config)))
    pool.write_config(config, p.state_dir)  # monitoring = false: no dmeventd left behind
    p.config = config
    try:
        t = time.monotonic()
        p.start(timeout=PLUGIN_START_TIMEOUT)
        _phase("volume plugin started", t)
        yield p
        t = time.monotonic()
        dockerd.remove_all_containers(timeout=DOCKER_TIMEOUT)
        left = dockerd.docker("volume", "ls", "-q", "--filter", f"driver={p.name}", timeout=DOCKER_TIMEOUT)
        for volume in left.stdout.split():
            dockerd.docker("volume", "rm", volume, check=False, timeout=DOCKER_TIMEOUT)
        _phase("teardown: containers and volumes removed", t)
    finally:
        p.destroy()


@contextlib.contextmanager
def _logs_on_failure(dockerd, plugin):
    try:
        yield
    except BaseException:
        print(f"--- dockerd log ---\n{dockerd.log_tail(30)}\n--- volume plugin log ---\n{plugin.log_tail(60)}",
              file=sys.stderr)
        raise


def _docker_fn(dockerd):
    """``docker(*args, check=True, timeout=...)`` for tests.lab.pgimage's helpers, with timeouts raised to
    what a TCG guest needs (their own are sized for the host)."""
    def docker(*args, check=True, timeout=60.0, input=None):
        return dockerd.docker(*args, check=check, timeout=max(timeout, 120.0), input=input)
    return docker


def _admin(plugin, *args) -> str:
    """The admin CLI on the plugin's own configuration and state (same host)."""
    proc = subprocess.run([sys.executable, "-m", "volplugin", *args, "--config", str(plugin.config),
                           "--state-dir", str(plugin.state_dir)], capture_output=True, text=True,
                          cwd=REPO_ROOT, timeout=ADMIN_TIMEOUT)
    assert proc.returncode == 0, f"volplugin {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}"
    return proc.stdout


def _run_pg(docker, name: str, volume: str) -> float:
    docker("run", "-d", "--name", name, "--network", "none", "--stop-signal", "SIGINT",
           "-v", f"{volume}:{MOUNT_POINT}", "-e", f"PGDATA={PGDATA}", POSTGRES_IMAGE, timeout=DOCKER_TIMEOUT)
    return wait_pg_ready(docker, name, timeout=PG_READY_TIMEOUT)


def _mounts_under(path) -> list[str]:
    prefix = str(path).rstrip("/") + "/"
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if line.split()[4].startswith(prefix)]


def test_postgres_on_lvm_survives_snapshots_and_clones(pool, dockerd, volplugin):
    docker = _docker_fn(dockerd)
    vol, clone = f"pg{os.urandom(3).hex()}", f"pgc{os.urandom(3).hex()}"
    with _logs_on_failure(dockerd, volplugin):
        t = time.monotonic()
        docker("volume", "create", "-d", volplugin.name, "-o", "backend=lvm", "-o", "size=1G", "-o", "fs=xfs", vol)
        t = _phase("volume created (lvcreate + mkfs.xfs)", t)
        inspect = json.loads(docker("volume", "inspect", vol).stdout)[0]
        status = inspect["Status"]
        assert inspect["Driver"] == volplugin.name and inspect["Scope"] == "local", inspect
        assert status["backend"] == "lvm" and status["fs"] == "xfs" and status["size"] == 2**30, status
        assert status["vg"] == pool.vg and status["thin_pool"] == pool.pool, status
        assert isinstance(status["pool_data_percent"], (int, float)) and status["active"] is False, status
        listed = docker("volume", "ls", "--format", "{{.Name}} {{.Driver}} {{.Scope}}").stdout.splitlines()
        assert f"{vol} {volplugin.name} local" in listed, listed
        row = pool.lvs()[vol]
        assert row["lv_active"] == "" and int(row["lv_size"]) == 2**30, row  # inactive until mounted
        t = _phase("volume inspected", t)

        waited = _run_pg(docker, "db1", vol)
        t = _phase(f"db1 running (initdb; {waited:.1f} s of it waiting for ready)", t)
        psql(docker, "db1", "CREATE TABLE t (n int); INSERT INTO t SELECT generate_series(1, 100)")
        status = json.loads(docker("volume", "inspect", "--format", "{{json .Status}}", vol).stdout)
        assert status["pg_version"] == "15" and status["attached_host"] == "hostA", status
        assert status["active"] is True and len(status["containers"]) == 1, status
        t = _phase("rows written, volume inspected", t)

        # While PostgreSQL runs: LVM suspends (and so freezes) the origin itself; no fsfreeze around it.
        _admin(volplugin, "snapshot", "create", f"{vol}@s1")
        t = _phase("snapshot taken (admin CLI)", t)
        psql(docker, "db1", "INSERT INTO t VALUES (1000)")
        assert psql(docker, "db1", "SELECT count(*) FROM t") == "101"  # the database did not stall
        snaps = pool.lvs()
        assert f"{vol}+s1" in snaps and snaps[f"{vol}+s1"]["origin"] == vol, sorted(snaps)

        docker("rm", "-f", "db1")  # an unclean stop: PostgreSQL must replay its WAL next time
        assert pool.lvs()[vol]["lv_active"] == "", "the last Unmount deactivates the LV"
        t = _phase("db1 killed and removed", t)
        waited = _run_pg(docker, "db2", vol)
        t = _phase(f"db2 running on the same volume (WAL replay; {waited:.1f} s waiting for ready)", t)
        assert psql(docker, "db2", "SELECT count(*), max(n) FROM t") == "101|1000"

        docker("volume", "create", "-d", volplugin.name, "-o", "backend=lvm", "-o", f"from={vol}@s1", clone)
        status = json.loads(docker("volume", "inspect", "--format", "{{json .Status}}", clone).stdout)
        assert status["backend"] == "lvm" and status["fs"] == "xfs" and status["origin"] == f"{vol}@s1", status
        t = _phase("clone of the snapshot created", t)
        waited = _run_pg(docker, "db3", clone)  # a second database, started from the snapshot
        t = _phase(f"db3 running on the clone ({waited:.1f} s waiting for ready)", t)
        assert psql(docker, "db3", "SELECT count(*), max(n) FROM t") == "100|100"
        assert psql(docker, "db2", "SELECT count(*) FROM t") == "101"

        proc = docker("volume", "rm", vol, check=False)
        assert proc.returncode != 0 and "in use" in proc.stderr, proc.stderr
        docker("rm", "-f", "db2", "db3")
        t = _phase("db2 and db3 removed", t)
        # The source goes first: a thin snapshot's clone shares blocks with it, not its identity.
        docker("volume", "rm", vol)
        docker("volume", "rm", clone)
        t = _phase("volumes removed", t)
        assert not {vol, clone} & set(docker("volume", "ls", "-q").stdout.split())
        left = [name for name in pool.lvs() if name != pool.pool]
        assert left == [], f"LVs left in {pool.vg}: {left}"
        assert _mounts_under(volplugin.state_dir) == []

"""Smoke test of the PostgreSQL test image (tests/lab/pgimage.py) in the lab's dockerd: on a host
directory prepared like a plugin volume (pgdata owned 999:999, mode 0700) a first container runs
initdb and serves; rows written with psql are seen by a second container on the same directory.
No volume plugin involved: this proves the image before the plugin's e2e tests rely on it."""
from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.lab import LAB_PREFIX
from tests.lab.pgimage import (MOUNT_POINT, PGDATA, PG_UID, POSTGRES_IMAGE, build_postgres_tar,
                               container_logs, host_clusters, import_postgres, prepare_volume_dir,
                               psql, skip_reason, wait_pg_ready)

pytestmark = pytest.mark.e2e


@pytest.fixture
def volume_dir():
    """A throwaway host directory shaped like a plugin volume (in /tmp: pytest's tmp dirs are
    0700 root, which 999 could not enter)."""
    root = Path(tempfile.mkdtemp(prefix=LAB_PREFIX + "pgvol-", dir="/tmp"))
    try:
        yield prepare_volume_dir(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _run_pg(docker, name: str, volume_dir: Path) -> str:
    docker("run", "-d", "--name", name, "--network", "none",
           "-v", f"{volume_dir}:{MOUNT_POINT}", POSTGRES_IMAGE)
    return name


def test_postgres_survives_container_replacement(dockerd, docker, pg_image, volume_dir):
    online_before = [c for c in host_clusters() if c["status"] == "online"]
    try:
        start = time.monotonic()
        _run_pg(docker, "pg1", volume_dir)
        wait_pg_ready(docker, "pg1", timeout=60)
        first_start = time.monotonic() - start
        print(f"\npgimage: first start (initdb + postgres ready) {first_start:.2f}s", file=sys.stderr)

        assert (volume_dir / "pgdata" / "PG_VERSION").read_text().strip() == "15"
        assert (volume_dir / "pgdata").stat().st_uid == PG_UID
        assert psql(docker, "pg1", "SHOW data_directory") == PGDATA
        assert psql(docker, "pg1", "SELECT current_user") == "postgres"
        assert psql(docker, "pg1", "SHOW listen_addresses") == ""
        psql(docker, "pg1", "CREATE TABLE t (id int PRIMARY KEY, v text)")
        psql(docker, "pg1", "INSERT INTO t SELECT g, 'row ' || g FROM generate_series(1, 100) g")
        assert psql(docker, "pg1", "SELECT count(*) FROM t") == "100"
        assert "ready to accept connections" in container_logs(docker, "pg1")

        start = time.monotonic()
        docker("stop", "-t", "30", "pg1")  # SIGTERM: smart shutdown, clean checkpoint
        docker("rm", "pg1")
        _run_pg(docker, "pg2", volume_dir)
        wait_pg_ready(docker, "pg2", timeout=60)
        print(f"pgimage: stop + second start {time.monotonic() - start:.2f}s", file=sys.stderr)

        assert "initdb" not in container_logs(docker, "pg2")
        assert psql(docker, "pg2", "SELECT count(*), sum(id) FROM t") == "100|5050"
        assert psql(docker, "pg2", "SELECT v FROM t WHERE id = 42") == "row 42"

        # a killed server (no shutdown checkpoint) recovers from WAL on the next start
        psql(docker, "pg2", "INSERT INTO t VALUES (101, 'after restart')")
        docker("rm", "-f", "pg2")
        _run_pg(docker, "pg3", volume_dir)
        wait_pg_ready(docker, "pg3", timeout=60)
        assert psql(docker, "pg3", "SELECT count(*) FROM t") == "101"
    finally:
        dockerd.docker("rm", "-f", "pg1", "pg2", "pg3", check=False)
    online_after = [c for c in host_clusters() if c["status"] == "online"]
    assert online_after == online_before, "a host PostgreSQL cluster was started"


def test_entrypoint_refuses_a_missing_pgdata(dockerd, docker, pg_image, volume_dir):
    """Without the plugin's pgdata directory the container exits with a clear message."""
    (volume_dir / "pgdata").rmdir()
    try:
        res = docker("run", "--name", "pgbad", "--network", "none",
                     "-v", f"{volume_dir}:{MOUNT_POINT}", POSTGRES_IMAGE, check=False, timeout=60)
        assert res.returncode != 0
        assert "must exist and be writable" in res.stderr + res.stdout
    finally:
        dockerd.docker("rm", "-f", "pgbad", check=False)

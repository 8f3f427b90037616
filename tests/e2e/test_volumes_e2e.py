"""volplugin through a real dockerd and a real single-node Ceph: PostgreSQL initdb's and runs on an RBD
volume, its rows survive replacing the container, and the clone of a snapshot starts as a second
database. Docker and the plugin share the root mount namespace; Ceph listens on its loopback."""
import os
import signal
import subprocess
import sys

import pytest

from tests.lab.pgimage import MOUNT_POINT, PGDATA, psql, wait_pg_ready

pytestmark = pytest.mark.e2e


def admin(volplugin, *args):
    """The admin CLI, on the plugin's own configuration and state (same host)."""
    return subprocess.run([sys.executable, "-m", "volplugin", *args, "--config", str(volplugin.config),
                           "--state-dir", str(volplugin.state_dir)], capture_output=True, text=True,
                          timeout=120, check=True).stdout


def run_pg(docker, image, name, volume):
    docker("run", "-d", "--name", name, "--network", "none", "--stop-signal", "SIGINT",
           "-v", f"{volume}:{MOUNT_POINT}", "-e", f"PGDATA={PGDATA}", image, timeout=120)
    wait_pg_ready(docker, name, timeout=90)


def test_postgres_data_survives_and_clones(docker, volplugin, pg_image):
    vol, clone = f"pg{os.urandom(3).hex()}", f"pgc{os.urandom(3).hex()}"
    docker("volume", "create", "-d", volplugin.name, "-o", "size=1G", "-o", "fs=xfs", vol)
    run_pg(docker, pg_image, "db1", vol)
    psql(docker, "db1", "CREATE TABLE t (n int); INSERT INTO t SELECT generate_series(1, 100)")
    inspect = docker("volume", "inspect", "--format", "{{json .Status}}", vol).stdout
    assert '"pg_version":"15"' in inspect.replace(" ", "") and '"attached_host":"hostA"' in inspect

    admin(volplugin, "snapshot", "create", f"{vol}@s1")  # while PostgreSQL runs: crash-consistent
    psql(docker, "db1", "INSERT INTO t VALUES (1000)")
    docker("rm", "-f", "db1")  # an unclean stop: PostgreSQL must replay its WAL next time
    run_pg(docker, pg_image, "db2", vol)
    assert psql(docker, "db2", "SELECT count(*), max(n) FROM t").strip() == "101|1000"

    docker("volume", "create", "-d", volplugin.name, "-o", f"from={vol}@s1", clone)
    run_pg(docker, pg_image, "db3", clone)  # a second database, started from the snapshot
    assert psql(docker, "db3", "SELECT count(*), max(n) FROM t").strip() == "100|100"
    assert psql(docker, "db2", "SELECT count(*) FROM t").strip() == "101"

    proc = docker("volume", "rm", vol, check=False)
    assert proc.returncode != 0 and "in use" in proc.stderr
    docker("rm", "-f", "db2", "db3")
    docker("volume", "rm", clone)
    docker("volume", "rm", vol)
    assert vol not in docker("volume", "ls", "-q").stdout
    assert f"{vol} " not in admin(volplugin, "status")


@pytest.mark.parametrize("options, message", [
    (["-o", "size=banana"], "is not a size"),
    (["-o", "colour=red"], "unknown option colour"),
    (["-o", "fs=ntfs"], "not supported"),
    (["-o", "from=ghost@s1"], "source volume ghost does not exist"),
])
def test_bad_volume_options_fail_through_the_cli(docker, volplugin, options, message):
    name = f"bad{os.urandom(3).hex()}"
    proc = docker("volume", "create", "-d", volplugin.name, *options, name, check=False)
    assert proc.returncode != 0 and message in proc.stderr
    assert name not in docker("volume", "ls", "-q").stdout


def test_bad_volume_name_fails(docker, volplugin):
    proc = docker("volume", "create", "-d", volplugin.name, "a..b", check=False)
    assert proc.returncode != 0 and "is invalid" in proc.stderr


def test_plugin_kill_9_and_dockerd_restart_keep_the_database(docker, dockerd, volplugin, pg_image):
    vol = f"pgk{os.urandom(3).hex()}"
    docker("volume", "create", "-d", volplugin.name, "-o", "size=1G", "-o", "fs=ext4", vol)
    run_pg(docker, pg_image, "db1", vol)
    psql(docker, "db1", "CREATE TABLE t (n int); INSERT INTO t VALUES (1)")
    volplugin.kill(signal.SIGKILL)  # the mount must not depend on the plugin process
    psql(docker, "db1", "INSERT INTO t VALUES (2)")
    volplugin.start()
    dockerd.restart()  # --live-restore: the database keeps running, Docker sends no new Mount
    psql(docker, "db1", "INSERT INTO t VALUES (3)")
    docker("rm", "-f", "db1")  # its Unmount reaches the restarted plugin: the last caller is gone
    assert docker("volume", "inspect", "--format", "{{.Mountpoint}}", vol).stdout.strip() == ""
    assert not [line for line in open("/proc/self/mountinfo") if f"/mounts/{vol} " in line]
    run_pg(docker, pg_image, "db2", vol)
    assert psql(docker, "db2", "SELECT count(*) FROM t").strip() == "3"
    docker("rm", "-f", "db2")

"""volplugin.cephlab.EmbeddedCeph against real ceph-mon/ceph-osd daemons.

What the embedded default backend promises: it comes up and serves RBD on loopback only, its data
is persistent (a clean stop and a kill -9 of both daemons lose nothing acknowledged), repeated
ensure_running() calls are cheap and safe from several processes, clients of a dead cluster fail
within their timeout, and stop() leaves nothing behind.
"""
from __future__ import annotations

import concurrent.futures
import configparser
import contextlib
import json
import os
import signal
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.lab import REPO_ROOT, sh, wait_until
from tests.lab.ceph import daemons_of
from volplugin.cephlab import CephLabError, EmbeddedCeph

rados = pytest.importorskip("rados")
rbd = pytest.importorskip("rbd")

MiB = 1 << 20


@contextlib.contextmanager
def connect(cluster: EmbeddedCeph, **conf):
    """A connected librados handle from the cluster's conf (``conf`` overrides options)."""
    handle = rados.Rados(conffile=cluster.conf_path, conf={k: str(v) for k, v in conf.items()})
    try:
        handle.connect()
        yield handle
    finally:
        handle.shutdown()


def write_image(cluster: EmbeddedCeph, name: str, payload: bytes, offset: int = MiB) -> None:
    """Create image ``name`` and write ``payload`` at ``offset``; closing flushes librbd's cache,
    so the OSD has acknowledged the data when this returns."""
    with connect(cluster) as handle, handle.open_ioctx(cluster.pool) as ioctx:
        rbd.RBD().create(ioctx, name, 64 * MiB)
        with rbd.Image(ioctx, name) as image:
            image.write(payload, offset)
            image.flush()


def read_image(cluster: EmbeddedCeph, name: str, length: int, offset: int = MiB) -> bytes:
    with connect(cluster) as handle, handle.open_ioctx(cluster.pool) as ioctx, \
            rbd.Image(ioctx, name, read_only=True) as image:
        return image.read(offset, length)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def assert_all_gone(cluster: EmbeddedCeph) -> None:
    assert not cluster.is_running()
    assert cluster.daemon_pids() == {}
    assert daemons_of(cluster.conf_path) == []


# --- the shared cluster ------------------------------------------------------------------------

def test_rbd_image_create_write_read(ceph):
    name, payload = unique("roundtrip"), os.urandom(8192)
    write_image(ceph, name, payload)
    assert read_image(ceph, name, len(payload)) == payload
    with connect(ceph) as handle, handle.open_ioctx(ceph.pool) as ioctx:
        assert name in rbd.RBD().list(ioctx)
        assert ioctx.application_list() == ["rbd"]  # the pool was initialised for RBD
        rbd.RBD().remove(ioctx, name)


def test_conf_gives_clients_short_timeouts_and_no_admin_socket(ceph):
    with connect(ceph) as handle:
        assert handle.conf_get("admin_socket") == ""
        for option in ("client_mount_timeout", "rados_osd_op_timeout", "rados_mon_op_timeout"):
            assert float(handle.conf_get(option)) == ceph.client_timeout


def test_osd_store_is_bluestore_on_a_sparse_file_in_the_directory(ceph):
    conf = configparser.ConfigParser(interpolation=None)
    conf.read(ceph.conf_path)
    assert conf["osd"]["osd_objectstore"] == "bluestore"
    assert "bluestore_block_path" not in conf["osd"]  # the default, osd_data/block
    block = os.stat(os.path.join(ceph.directory, "osd", "block"))
    assert block.st_size == ceph.store_gib << 30
    assert block.st_blocks * 512 < block.st_size // 4  # sparse: only what was written


def test_daemons_listen_on_loopback_only(ceph):
    pids = ceph.daemon_pids()
    assert set(pids) == {"mon", "osd"}
    listening = [line.split() for line in sh(["ss", "-Hltnp"]).stdout.splitlines()
                 if any(f"pid={pid}," in line for pid in pids.values())]
    assert len(listening) >= 3  # the mon's v2 and v1 ports, the OSD's ports
    assert all(cols[3].startswith("127.0.0.1:") for cols in listening), listening
    state = json.loads(Path(ceph.directory, "cluster.json").read_text())
    assert f"127.0.0.1:{state['mon_port']}" in {cols[3] for cols in listening}


def test_ensure_running_on_a_running_cluster_is_a_cheap_noop(ceph):
    before = ceph.daemon_pids()
    began = time.monotonic()
    assert ceph.ensure_running() is ceph
    elapsed = time.monotonic() - began
    assert ceph.daemon_pids() == before
    assert elapsed < 0.5, f"ensure_running() on a running cluster took {elapsed:.2f}s"


def test_a_second_handle_on_the_directory_sees_the_same_cluster(ceph):
    # The plugin's workers each build their own EmbeddedCeph for the same directory.
    other = EmbeddedCeph(ceph.directory).ensure_running()
    assert other.daemon_pids() == ceph.daemon_pids()
    assert other.conf_path == ceph.conf_path


# --- private clusters (stopped, killed) --------------------------------------------------------

def test_data_survives_stop_and_restart(own_ceph):
    name, payload = unique("persist"), os.urandom(4096)
    write_image(own_ceph, name, payload)
    conf_before = Path(own_ceph.conf_path).read_text()
    own_ceph.stop()
    assert_all_gone(own_ceph)
    own_ceph.stop()  # idempotent
    assert_all_gone(own_ceph)
    own_ceph.ensure_running()
    assert own_ceph.is_running()
    assert Path(own_ceph.conf_path).read_text() == conf_before  # same fsid and ports
    assert read_image(own_ceph, name, len(payload)) == payload


def test_data_survives_kill_9_of_both_daemons(own_ceph):
    name, payload = unique("crash"), os.urandom(4096)
    write_image(own_ceph, name, payload)
    pids = own_ceph.daemon_pids()
    for pid in pids.values():
        os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not daemons_of(own_ceph.conf_path), 10, "killed daemons to be gone")
    assert not own_ceph.is_running()  # stale pid files must not count as running
    began = time.monotonic()
    own_ceph.ensure_running()
    elapsed = time.monotonic() - began
    assert set(own_ceph.daemon_pids().values()).isdisjoint(pids.values())
    assert read_image(own_ceph, name, len(payload)) == payload
    later = os.urandom(4096)
    write_image(own_ceph, unique("after-crash"), later)  # and it takes new writes
    assert elapsed < 30, f"recovery after kill -9 took {elapsed:.1f}s"


def test_client_of_a_stopped_cluster_fails_within_its_timeout(own_ceph):
    own_ceph.stop()
    handle = rados.Rados(conffile=own_ceph.conf_path, conf={"client_mount_timeout": "2"})
    began = time.monotonic()
    with pytest.raises(rados.Error):
        handle.connect(timeout=2)
    elapsed = time.monotonic() - began
    handle.shutdown()
    assert elapsed < 10, f"connecting to a dead cluster took {elapsed:.1f}s"


def test_io_with_the_osd_down_times_out_then_resumes_after_start_osd(own_ceph):
    name, payload = unique("osd-down"), os.urandom(4096)
    write_image(own_ceph, name, payload)
    own_ceph.stop_osd()
    assert set(own_ceph.daemon_pids()) == {"mon"}
    with connect(own_ceph, rados_osd_op_timeout=2) as handle, \
            handle.open_ioctx(own_ceph.pool) as ioctx:
        began = time.monotonic()
        with pytest.raises(rados.Error):
            ioctx.write_full("while-osd-down", b"x")
        assert time.monotonic() - began < 10
    own_ceph.start_osd()
    assert own_ceph.is_running()
    assert read_image(own_ceph, name, len(payload)) == payload


def test_concurrent_first_starts_make_one_cluster(new_ceph):
    # Gunicorn workers all call ensure_running() at start-up: one must create, the others wait.
    script = ("import json, sys; from volplugin.cephlab import EmbeddedCeph; "
              "print(json.dumps(EmbeddedCeph(sys.argv[1]).ensure_running().daemon_pids()))")
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        runs = [pool.submit(sh, [sys.executable, "-c", script, new_ceph.directory], timeout=120,
                            env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
                for _ in range(3)]
        reported = [json.loads(run.result().stdout) for run in runs]
    assert all(r == reported[0] for r in reported), reported
    assert len(daemons_of(new_ceph.conf_path)) == 2  # one mon, one OSD
    new_ceph.destroy()
    assert not os.path.exists(new_ceph.directory)
    assert daemons_of(new_ceph.conf_path) == []


def test_destroy_refuses_a_directory_that_holds_no_cluster(tmp_path):
    (tmp_path / "precious").write_text("not a cluster")
    with pytest.raises(CephLabError, match="holds no embedded cluster"):
        EmbeddedCeph(str(tmp_path)).destroy()
    assert (tmp_path / "precious").exists()


def test_a_different_mon_port_than_the_clusters_is_refused(ceph):
    state = json.loads(Path(ceph.directory, "cluster.json").read_text())
    with pytest.raises(CephLabError, match="fixed in its monmap"):
        EmbeddedCeph(ceph.directory, mon_port=state["mon_port"] + 1).ensure_running()
    assert ceph.is_running()

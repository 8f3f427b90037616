"""The lab's etcd (tests.lab.etcd.EtcdServer): the cluster tests trust it to keep data across
restarts and crashes, to be unreachable-but-intact while paused, and to leave nothing behind.
Quick (a start takes well under a second) but real: root and Debian's etcd-server are needed."""
from __future__ import annotations

import os
import signal
import time

import pytest
from etcd3gw import exceptions as etcd_errors
from etcd3gw.client import Etcd3Client

from tests.lab import NETNS_DIR, ProcRef, sigterm_unwinds
from tests.lab.etcd import EtcdServer, servers_of, skip_reason

SKIP_REASON = skip_reason()
pytestmark = pytest.mark.skipif(SKIP_REASON is not None, reason=f"lab etcd unavailable: {SKIP_REASON}")


@pytest.fixture
def server(tmp_path):
    with sigterm_unwinds():  # a CI timeout still stops etcd through destroy()
        srv = EtcdServer(tmp_path)
        try:
            yield srv
        finally:
            srv.destroy()


def client(srv: EtcdServer, timeout: float = 5) -> Etcd3Client:
    return Etcd3Client(host=srv.address, port=srv.client_port, timeout=timeout)


def values(srv: EtcdServer, key: str, timeout: float = 5) -> list[bytes]:
    return client(srv, timeout).get(key)


def test_put_get_then_restart_keeps_data(server):
    server.start()
    first = server.start_seconds
    assert client(server).put("/lab/k", "v1")
    assert values(server, "/lab/k") == [b"v1"]
    pid = server.pid
    server.restart()
    assert server.pid != pid
    assert values(server, "/lab/k") == [b"v1"]
    assert client(server).status()["header"]["member_id"]
    print(f"\netcd start {first:.2f}s, restart {server.start_seconds:.2f}s")


def test_pause_makes_calls_time_out_and_resume_brings_it_back(server):
    server.start()
    client(server).put("/lab/p", "kept")
    server.pause()
    assert server.alive() and server.paused
    t0 = time.monotonic()
    with pytest.raises((etcd_errors.ConnectionTimeoutError, etcd_errors.ConnectionFailedError)):
        values(server, "/lab/p", timeout=2)
    assert time.monotonic() - t0 < 10  # a timeout, not a hang
    server.resume()
    assert values(server, "/lab/p", timeout=2) == [b"kept"]


def test_kill_then_start_on_the_same_data_dir_keeps_data(server):
    server.start()
    c = client(server)
    for i in range(20):
        c.put(f"/lab/crash/{i}", str(i))
    ref = ProcRef(server.pid)
    server.kill()
    assert not ref.alive() and not server.alive()
    server.start()
    assert values(server, "/lab/crash/19") == [b"19"]
    assert len(client(server).get_prefix("/lab/crash/")) == 20


def test_stop_of_a_paused_server_is_clean_and_quick(server):
    server.start()
    server.pause()
    t0 = time.monotonic()
    server.stop()
    assert time.monotonic() - t0 < 5  # SIGTERM acted on (SIGCONT), no SIGKILL timeout
    assert server.proc.returncode in (0, -signal.SIGTERM)
    server.start()  # and the data dir is fine
    assert client(server).put("/lab/after", "x")


def test_destroy_leaves_no_process_and_no_directory(tmp_path):
    srv = EtcdServer(tmp_path)
    srv.start()
    ref, directory = ProcRef(srv.pid), srv.dir
    assert directory.name.startswith("nplab-") and (srv.data_dir / "member").is_dir()
    srv.pause()  # the worst case: a stopped process must still go
    srv.destroy()
    assert not ref.alive()
    assert not servers_of(srv.data_dir)
    assert not directory.exists()
    assert tmp_path.exists()  # the caller's directory is the caller's
    srv.destroy()  # twice is fine


def test_start_failure_names_the_cause_and_leaves_no_process(tmp_path):
    a = EtcdServer(tmp_path)
    b = EtcdServer(tmp_path)
    try:
        a.start()
        b.client_port = a.client_port  # the port is taken: etcd exits at once
        with pytest.raises(RuntimeError, match="etcd failed to start"):
            b.start(timeout=10)
        assert not b.alive() and not servers_of(b.data_dir)
    finally:
        a.destroy()
        b.destroy()


@pytest.mark.kernel
def test_inside_a_lab_netns(tmp_path):
    from tests.lab.netns import Lab  # pyroute2: only for this test

    lab = Lab()
    srv = None
    try:
        ns = lab.netns("etcd")
        srv = EtcdServer(tmp_path, netns=ns)
        srv.start()
        assert srv.url == "http://127.0.0.1:2379"
        # etcd itself runs in the lab's namespace, not ours
        assert os.stat(f"/proc/{srv.pid}/ns/net").st_ino == os.stat(f"{NETNS_DIR}/{ns}").st_ino
        assert os.stat(f"/proc/{srv.pid}/ns/net").st_ino != os.stat("/proc/self/ns/net").st_ino
        srv.etcdctl("put", "/lab/ns", "inside")
        srv.restart()
        assert srv.etcdctl("get", "--print-value-only", "/lab/ns").stdout.strip() == "inside"
        assert '"health":"true"' in srv.http("/health")
    finally:
        if srv is not None:
            srv.destroy()
        lab.destroy()

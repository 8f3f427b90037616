"""`netplugin serve` as a process (socket mode, stale socket, readiness) and configuration precedence."""
import os
import signal
import socket
import stat
import subprocess
import sys
import time

import pytest

from netplugin import config as netconfig
from plugincore.errors import InvalidRequest
from tests.lab import plugin_post


def _serve(tmp_path, sock):
    with open(tmp_path / "log", "w") as log:
        return subprocess.Popen([sys.executable, "-m", "netplugin", "serve", "--socket", str(sock),
                                 "--state-dir", str(tmp_path / "state")], stdout=subprocess.DEVNULL,
                                stderr=log, start_new_session=True)


def _stop(proc):
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _wait_listening(sock, timeout=5.0) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(sock))
            return time.monotonic() - start
        except OSError:
            time.sleep(0.02)
    raise AssertionError(f"{sock} not listening after {timeout}s")


def test_serve_replaces_stale_socket_root_only(tmp_path):
    sock = tmp_path / "run" / "np.sock"
    sock.parent.mkdir()
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(sock))
    stale.close()  # a socket file nobody listens on, as a crashed plugin leaves it
    proc = _serve(tmp_path, sock)
    try:
        _wait_listening(sock)
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
        assert plugin_post(sock, "/Plugin.Activate")[1] == {"Implements": ["NetworkDriver", "IpamDriver"]}
        # A second server must not steal the live socket.
        second = subprocess.run([sys.executable, "-m", "netplugin", "serve", "--socket", str(sock),
                                 "--state-dir", str(tmp_path / "state2")], capture_output=True, text=True,
                                timeout=30)
        assert second.returncode == 2 and "already serving" in second.stderr
        assert plugin_post(sock, "/Plugin.Activate")[0] == 200
    finally:
        _stop(proc)


def test_serve_refuses_a_non_socket_path(tmp_path):
    path = tmp_path / "file.sock"
    path.write_text("important")
    proc = subprocess.run([sys.executable, "-m", "netplugin", "serve", "--socket", str(path), "--state-dir",
                           str(tmp_path / "s")], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "not a socket" in proc.stderr and path.read_text() == "important"


def test_config_precedence(tmp_path):
    toml = tmp_path / "np.toml"
    toml.write_text('socket = "/tmp/from-file.sock"\nworkers = 3\n[ipam]\ndefault_prefix = 26\n')
    env = {"NETPLUGIN_WORKERS": "5", "NETPLUGIN_IPAM_DEFAULT_SUPERNET": "10.50.0.0/16"}
    cfg = netconfig.load(str(toml), {"socket": "/tmp/from-flag.sock", "workers": None}, environ=env)
    assert cfg["socket"] == "/tmp/from-flag.sock"  # flag beats file
    assert cfg["workers"] == 5  # environment beats file
    assert cfg["ipam"] == {"default_supernet": "10.50.0.0/16", "default_prefix": 26,
                           "default_supernet_v6": "", "default_prefix_v6": 64}
    assert netconfig.load(environ={})["socket"] == "/run/docker/plugins/netplugin.sock"


def test_shipped_config_matches_defaults():
    shipped = os.path.join(os.path.dirname(__file__), "..", "..", "config", "netplugin.toml")
    assert netconfig.load(shipped, environ={}) == netconfig.DEFAULTS


@pytest.mark.parametrize("content, env, message", [
    ("colour = 1\n", {}, "unknown configuration key 'colour'"),
    ("workers = [\n", {}, "np.toml"),
    ("", {"NETPLUGIN_WORKERS": "many"}, "expected an integer"),
])
def test_bad_config_is_a_clear_error(tmp_path, content, env, message):
    toml = tmp_path / "np.toml"
    toml.write_text(content)
    with pytest.raises(InvalidRequest, match=message):
        netconfig.load(str(toml), environ=env)


@pytest.mark.parametrize("cluster, message", [
    ({"store": "consul"}, "cluster.store 'consul' is not one of local, etcd"),
    ({"scope": "swarm"}, "cluster.scope 'swarm' is not one of auto, local, global"),
    ({"vni_min": 10, "vni_max": 5}, "vni_min/vni_max"),
    ({"store": "etcd", "etcd_endpoints": ""}, "no etcd endpoints configured"),
    ({"store": "etcd", "etcd_endpoints": "10.0.0.1:2379"}, "is not like http://HOST:PORT"),
    ({"store": "etcd", "etcd_endpoints": "http://10.0.0.1:2379", "etcd_prefix": "np"}, "must start and end"),
])
def test_bad_cluster_config_stops_the_service(tmp_path, cluster, message):
    from netplugin.service import Services
    config = netconfig.load(overrides={"state_dir": str(tmp_path / "s")}, environ={})
    config["cluster"].update(cluster)
    with pytest.raises(InvalidRequest, match=message):
        Services(config)


def test_scope_follows_the_cluster_store(tmp_path):
    from netplugin.service import Services
    config = netconfig.load(overrides={"state_dir": str(tmp_path / "s")}, environ={})
    assert Services(config).driver.capabilities()["Scope"] == "local"
    config["cluster"].update(store="etcd", etcd_endpoints="http://192.0.2.1:2379")  # never contacted
    assert Services(config).driver.capabilities()["Scope"] == "global"
    config["cluster"]["scope"] = "local"
    assert Services(config).driver.capabilities()["Scope"] == "local"


# A plugin whose start-up step (in the master, before any worker) blocks on a command, as an lvm command
# scanning a device that waits on an unreachable Ceph did.
BLOCKED_START_UP = """
import sys
from flask import Flask
from plugincore.run import run
from plugincore.serve import serve

def on_ready():
    print("start-up step running", flush=True)
    run(["sleep", "600"], timeout=900)

serve(lambda: Flask("blocked"), sys.argv[1], workers=1, threads=1, on_ready=on_ready)
"""


def test_a_stop_signal_ends_a_blocked_start_up(tmp_path):
    """systemd and Docker stop a plugin with SIGTERM to the main process; gunicorn only queues it for a
    main loop that starts after the start-up step, so a blocked start-up ignored it for as long as it
    blocked (the service then needed a SIGKILL). Now the master leaves at once and its command is killed."""
    sock = tmp_path / "blocked.sock"
    log = tmp_path / "log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-c", BLOCKED_START_UP, str(sock)], stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while "start-up step running" not in log.read_text() or not _group_members(proc.pid, "sleep"):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0, log.read_text()
        assert "stopped by SIGTERM during start-up" in log.read_text()
        deadline = time.monotonic() + 5
        while _group_members(proc.pid, "sleep"):  # the blocked command went with it
            assert time.monotonic() < deadline, "the start-up's command outlived the plugin"
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            _stop(proc)
        for pid in _group_members(proc.pid, ""):
            os.kill(pid, signal.SIGKILL)


def _group_members(pgid: int, comm: str) -> list[int]:
    """PIDs in process group ``pgid`` whose command name starts with ``comm``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)
            name = fields[0].split("(", 1)[1]
            if int(fields[1].split()[2]) == pgid and name.startswith(comm):
                found.append(int(entry))
        except (OSError, IndexError, ValueError):
            continue
    return found

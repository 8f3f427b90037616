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

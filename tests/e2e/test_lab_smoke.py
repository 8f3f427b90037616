"""Smoke tests for the e2e lab itself: the emulated network, the dockerd in hosta, the plugin
harness (against a stub plugin defined at the bottom of this file) and leak-free teardown.

Run as a script (``python test_lab_smoke.py serve --socket S ...``) this file IS that stub.
"""
from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest

from tests.lab import LAB_PREFIX, PLUGIN_DIR, mounts_under, pids_with_arg
from tests.lab.dockerd import Dockerd
from tests.lab.image import IMAGE
from tests.lab.netns import Lab, build_physnet, list_netns
from tests.lab.plugin import Plugin

pytestmark = pytest.mark.e2e


def _netns_inode(path: str) -> int:
    return os.stat(path).st_ino


def test_router_pings_hostb_across_the_switch(physnet):
    lab = physnet.lab
    assert lab.ping(physnet.router, physnet.hostb_ip)
    assert lab.ping(physnet.hostb, physnet.gateway)
    hosta = lab.links(physnet.hosta)
    for parent in (physnet.parent, physnet.parent2):
        assert hosta[parent]["up"] and hosta[parent]["kind"] == "veth"
        assert lab.addresses(physnet.hosta, parent) == []
    ports = {n: i for n, i in lab.links(physnet.sw).items() if i["master"]}
    assert set(ports) == {"p-router", "p-hostb", "p-hosta1", "p-hosta2"}


def test_dockerd_runs_in_hosta_with_the_image(dockerd, docker, physnet):
    assert _netns_inode(f"/proc/{dockerd.pid}/ns/net") == \
        _netns_inode(f"/run/netns/{physnet.hosta}")
    assert docker("version", "--format", "{{.Server.Version}}").stdout.startswith("20.10")
    out = docker("run", "--rm", "--network", "none", IMAGE, "/bin/ip", "addr").stdout
    assert "lo:" in out and "eth0" not in out


def test_container_on_builtin_macvlan_reaches_router(dockerd, docker, physnet):
    """The emulated wire works end to end for a real container (no plugin involved)."""
    docker("network", "create", "-d", "macvlan", "-o", f"parent={physnet.parent}",
           "--subnet", physnet.subnet, "--gateway", physnet.gateway, "mv")
    docker("run", "-d", "--name", "c1", "--network", "mv", "--ip", physnet.ip(10), IMAGE,
           "sleep", "600")
    physnet.lab.wait_ping(physnet.router, physnet.ip(10))
    res = docker("exec", "c1", "ping", "-c", "1", "-W", "2", physnet.hostb_ip, check=False)
    assert res.returncode == 0, res.stdout + res.stderr


def test_hygiene_reset_between_tests(dockerd, docker, physnet):
    """The previous test's container, network and macvlan are gone; hosta is as built."""
    assert dockerd.containers() == []
    assert dockerd.networks() == []
    assert set(physnet.lab.links(physnet.hosta)) == set(physnet.baseline)


def test_dockerd_restart_and_kill9_keep_containers(dockerd, docker):
    """restart() (SIGTERM) and kill(SIGKILL) + start() both keep containers (--live-restore)."""
    docker("run", "-d", "--name", "lr", "--network", "none", IMAGE, "sleep", "600")
    dockerd.restart()
    assert docker("inspect", "-f", "{{.State.Running}}", "lr").stdout.strip() == "true"
    dockerd.kill(signal.SIGKILL)
    assert not dockerd.alive()
    dockerd.start()
    assert docker("inspect", "-f", "{{.State.Running}}", "lr").stdout.strip() == "true"


def test_plugin_harness_with_stub(dockerd, docker, tmp_path, physnet):
    p = Plugin(dockerd.netns, tmp_path / "stub", command=[sys.executable, __file__])
    try:
        p.start()
        assert p.socket == Path(PLUGIN_DIR) / f"{p.name}.sock"
        assert _netns_inode(f"/proc/{p.pid}/ns/net") == _netns_inode(f"/run/netns/{p.netns}")
        assert p.call("/NetworkDriver.GetCapabilities", {}) == {"Scope": "local"}
        docker("network", "create", "-d", p.name, "--ipam-driver", p.name,
               "--subnet", "10.88.0.0/24", "--gateway", "10.88.0.1", "stubnet")
        assert [n["driver"] for n in dockerd.networks()] == [p.name]

        p.kill(signal.SIGKILL)  # leaves a stale socket behind, as a crash would
        assert not p.alive() and p.socket.exists()
        p.start()
        assert p.starts == 2 and "CreateNetwork" in p.log.read_text()
        docker("network", "rm", "stubnet")
        assert dockerd.networks() == []
    finally:
        p.destroy()
    assert not p.socket.exists() and not p.alive()


def test_real_plugin_activates(plugin):
    reply = plugin.call("/Plugin.Activate")
    assert {"NetworkDriver", "IpamDriver"} <= set(reply["Implements"])


def test_teardown_leaves_nothing(busybox_tar, tmp_path):
    """A whole lab (netns, dockerd with a running container, stub plugin) torn down in fixture
    order leaves no netns, process, mount, socket or directory; also after a partial setup."""
    lab = Lab()
    daemon = plugin = None
    try:
        net = build_physnet(lab)
        daemon = Dockerd(net.hosta).start()
        daemon.import_image(busybox_tar)
        daemon.docker("run", "-d", "--network", "none", IMAGE, "sleep", "600")
        plugin = Plugin(net.hosta, tmp_path / "stub", command=[sys.executable, __file__])
        plugin.start()
        root, dpid = daemon.root, daemon.pid
        assert pids_with_arg(str(root) + "/"), "containerd/shim should be running"
    finally:
        if plugin:
            plugin.destroy()
        if daemon:
            daemon.destroy()
        lab.destroy()
    assert list_netns(lab.prefix) == []
    assert not os.path.exists(f"/proc/{dpid}")
    assert pids_with_arg(str(root) + "/") == []
    assert mounts_under(root) == [] and not root.exists()
    assert not plugin.socket.exists()

    half = Lab()  # partial setup: one netns made, then a failing veth into a foreign netns
    try:
        ns = half.netns("only")
        with pytest.raises(ValueError):
            half.veth(ns, "eth0", "not-ours", "eth0")
    finally:
        half.destroy()
    assert list_netns(half.prefix) == []
    assert all(not n.startswith(half.prefix) for n in list_netns(LAB_PREFIX))


# --- the stub plugin (run as a script by the tests above) --------------------------------------

def _stub_reply(path: str, body: dict) -> dict:
    pool = body.get("Pool") or body.get("PoolID") or ""
    replies = {
        "/Plugin.Activate": lambda: {"Implements": ["NetworkDriver", "IpamDriver"]},
        "/NetworkDriver.GetCapabilities": lambda: {"Scope": "local"},
        "/IpamDriver.GetCapabilities": lambda: {"RequiresMACAddress": False},
        "/IpamDriver.GetDefaultAddressSpaces": lambda: {"LocalDefaultAddressSpace": "stub",
                                                         "GlobalDefaultAddressSpace": "stubg"},
        "/IpamDriver.RequestPool": lambda: {"PoolID": pool, "Pool": pool, "Data": {}},
        "/IpamDriver.RequestAddress": lambda: {
            "Address": f"{body.get('Address') or pool.split('/')[0]}/{pool.split('/')[-1]}"},
    }
    if path in replies:
        return replies[path]()
    if path.startswith(("/NetworkDriver.", "/IpamDriver.")):
        return {}
    return {"Err": f"stub: unknown endpoint {path}", "Error": f"stub: unknown endpoint {path}"}


def _stub_main(argv: list[str]) -> None:
    import socketserver
    from http.server import BaseHTTPRequestHandler

    sock = argv[argv.index("--socket") + 1]

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            body = json.loads(raw) if raw.strip() else {}
            print("stub:", self.path, json.dumps(body), file=sys.stderr, flush=True)
            data = json.dumps(_stub_reply(self.path, body or {})).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/vnd.docker.plugins.v1.2+json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, fmt, *args):
            pass

    class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
        daemon_threads = True

    if os.path.exists(sock):
        os.unlink(sock)  # stale socket of a killed instance
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server = Server(sock, Handler)
    try:
        server.serve_forever()
    finally:
        os.unlink(sock)


if __name__ == "__main__" and sys.argv[1:2] == ["serve"]:
    _stub_main(sys.argv)

"""Crash-injection torture through the real dockerd (tests/lab/docker_torture.py): DOCKER_TORTURE_OPS random
`docker` operations (default 80; the run stops early after DOCKER_TORTURE_SECONDS, default 140) on netplugin
networks over both parents and volplugin RBD volumes on the test Ceph: network create/rm, volume create/rm,
run (with --ip, an existing or a new volume, writing a token into it), rm -f, network connect/disconnect.
Faults: kill -9 of either plugin between operations and in the middle of one (also a few ms into a given
request), graceful plugin restarts, dockerd restarts and kills, an OSD stop/start during a volume operation.
An audit of Docker, both plugins' state, the kernel, this host's mounts and the RBD pool runs after every
round of 10 operations, after reading every volume's tokens and removing the containers, and once
everything was removed. Prints the counts of operations, faults, failed operations, what cut-off requests
left (counted apart) and findings; any finding fails the test. DOCKER_TORTURE_SEED replays a run's choices
(not its timing).

Found by it, with a regression test below: a RequestPool cut off by a kill came back from dockerd without its
body, and netplugin carved a default pool for it, which Docker used for the network of another --subnet."""
import http.server
import json
import os
import random
import secrets
import socketserver
import threading
import time

import pytest

from tests.lab import http_unix, wait_until
from tests.lab.docker_torture import DockerTorture
from tests.lab.image import IMAGE

pytestmark = pytest.mark.e2e
ROUND = 10
ROUTER_SECOND = "10.77.0.129/25"  # the router's address on the eth2 network (the gateway of that slot)


def test_docker_operations_with_crashes_leak_nothing(physnet, dockerd, plugin, volplugin, ceph):
    seed = int(os.environ.get("DOCKER_TORTURE_SEED", random.randrange(1 << 30)))
    operations = int(os.environ.get("DOCKER_TORTURE_OPS", 80))
    seconds = float(os.environ.get("DOCKER_TORTURE_SECONDS", 140))
    physnet.lab.addr(physnet.router, "eth0", ROUTER_SECOND)
    torture = DockerTorture(dockerd, plugin, volplugin, physnet, ceph, random.Random(seed), f"dt{secrets.token_hex(2)}")
    started = time.monotonic()
    try:
        while torture.counts["operations"] < operations:
            torture.step()
            done = torture.counts["operations"]
            if done % ROUND == 0:
                torture.audit(f"after {done} operations")
            if time.monotonic() - started > seconds:
                torture.counts[f"operations before the {seconds:g} s bound"] = done
                if done % ROUND:
                    torture.audit(f"after {done} operations")
                break
        torture.check_data_and_remove_everything()
        torture.audit("after removing everything", final=True)
    finally:
        excused = ", ".join(f"{len(keys)} {kind}" for kind, keys in sorted(torture.excused.items()))
        print(f"\ndocker torture (seed {seed}, {time.monotonic() - started:.0f} s): "
              + ", ".join(f"{n} {what}" for what, n in torture.counts.items())
              + f"; left by cut-off requests, counted apart: {excused or 'nothing'}; {len(torture.findings)} findings")
        for reason, n in sorted(torture.failures.items(), key=lambda f: -f[1]):
            print(f"  failed {n}x {reason}")
        for finding in torture.findings[:40]:
            print(f"  FINDING {finding}")
        physnet.lab.sh(physnet.router, ["ip", "addr", "del", ROUTER_SECOND, "dev", "eth0"], check=False)
        if "osd" not in ceph.daemon_pids():  # a failure while it was stopped: the session's cluster goes on
            ceph.start_osd()
        for p in (plugin, volplugin):  # the fixtures remove what is left while both plugins answer
            if not p.alive():
                p.start(timeout=60)
    for p in (plugin, volplugin):
        assert "Traceback" not in p.log.read_text(errors="replace"), p.log_tail(80)
    assert torture.findings == []


class CuttingProxy(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """A plugin socket in front of ``plugin``'s: forwards every request, except that it closes the connection
    of the ``nth`` request to ``cut`` without an answer, as a plugin killed in the middle of it would: before
    forwarding it (nothing done) or, ``after_forwarding``, once the plugin carried it out (reply lost)."""
    daemon_threads = True

    def __init__(self, plugin, cut: str, *, nth: int = 1, after_forwarding: bool = False):
        self.target, self.cut, self.name = plugin.socket, cut, f"npcut{secrets.token_hex(3)}"
        self.path, self.seen = plugin.socket.with_name(f"{self.name}.sock"), []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                server.seen.append((self.path, body))
                cutting = self.path == server.cut and sum(p == server.cut for p, _ in server.seen) == nth
                if cutting and not after_forwarding:
                    self.close_connection = True
                    return
                status, answer = http_unix(server.target, "POST", self.path, body,
                                           {"Accept": self.headers.get("Accept", "")}, timeout=60)
                if cutting:
                    self.close_connection = True
                    return
                self.send_response(status)
                self.send_header("Content-Type", "application/vnd.docker.plugins.v1.2+json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args):
                pass

        super().__init__(str(self.path), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        self.path.unlink(missing_ok=True)


def test_a_cut_off_request_pool_never_yields_another_subnet(physnet, docker, plugin):
    """dockerd re-sends a request whose connection broke without its body (moby#39331). For RequestPool the
    plugin used to carve a default pool out of that empty request, and Docker built the network on it: a
    network on 10.200.0.0/24 for `--subnet 10.77.0.0/25`. The empty request is refused now."""
    proxy = CuttingProxy(plugin, "/IpamDriver.RequestPool")
    try:
        res = docker("network", "create", "-d", proxy.name, "--ipam-driver", proxy.name, "--subnet", "10.77.0.0/25",
                     "-o", "parent=eth1", "cutnet", check=False)
        retried = [body for path, body in proxy.seen if path == "/IpamDriver.RequestPool"]
        assert len(retried) == 2 and retried[1] == b"", proxy.seen  # what dockerd re-sent
        if res.returncode == 0:
            run = docker("run", "-d", "--name", "cutc", "--network", "cutnet", IMAGE, "sleep", "60", check=False)
            got = docker("inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}/{{.IPPrefixLen}} gw "
                         "{{.Gateway}}{{end}}", "cutc").stdout.strip() if run.returncode == 0 else run.stderr
            pools = plugin.state_rows("SELECT pool FROM ipam_pools")
            docker("rm", "-f", "cutc", check=False)
            docker("network", "rm", "cutnet")
            pytest.fail(f"`network create --subnet 10.77.0.0/25` went through: the plugin holds pools {pools}, "
                        f"a container got {got}")
        assert "RequestPool" in res.stderr and plugin.state_rows("SELECT id FROM ipam_pools") == []
    finally:
        proxy.close()


def test_a_network_docker_forgot_is_collected(docker, plugin):
    """A CreateNetwork whose reply was cut: Docker re-sent it empty (refused) and forgot the network, the
    plugin kept it with its parent NIC. The garbage collection against Docker's list (here every 1 s, with
    a grace of 3 s) deletes it and frees the parent; Docker's own networks stay."""
    plugin.env.update(NETPLUGIN_GC_INTERVAL="1", NETPLUGIN_GC_GRACE="3")
    plugin.restart()
    subnet = ["--subnet", "10.77.0.0/25", "--gateway", "10.77.0.1"]
    docker("network", "create", "-d", plugin.name, "--ipam-driver", plugin.name, *subnet, "-o", "parent=eth2",
           "kept")
    forgotten = secrets.token_hex(32)
    assert not plugin.call("/NetworkDriver.CreateNetwork", {
        "NetworkID": forgotten, "Options": {"com.docker.network.generic": {"parent": "eth1"}},
        "IPv4Data": [{"AddressSpace": "local", "Pool": "10.77.0.128/25", "Gateway": "10.77.0.129/25"}],
        "IPv6Data": []}).get("Err")
    refused = docker("network", "create", "-d", plugin.name, "--ipam-driver", plugin.name, "--subnet",
                     "10.77.0.128/25", "-o", "parent=eth1", "again", check=False)
    assert refused.returncode != 0 and "eth1" in refused.stderr
    wait_until(lambda: plugin.state_rows(f"SELECT id FROM networks WHERE id = '{forgotten}'") == [], 30,
               "the forgotten network collected")
    docker("network", "create", "-d", plugin.name, "--ipam-driver", plugin.name, "--subnet", "10.77.0.128/25",
           "-o", "parent=eth1", "again")
    time.sleep(5)  # more than the grace: Docker's networks are never collected
    kept = {n["Name"] for n in json.loads(docker("network", "inspect", "kept", "again").stdout)}
    assert kept == {"kept", "again"} and len(plugin.state_rows("SELECT id FROM networks")) == 2
    docker("network", "rm", "kept", "again")


def test_cut_ipam_replies_are_collected(docker, plugin):
    """A RequestPool, then a RequestAddress, that the plugin carried out but whose reply a kill cut: dockerd
    re-sent each empty (refused) and failed the `network create` / `run`, so the pool reference and the
    address stayed reserved in the plugin with nothing in Docker to release them. The garbage collection
    (every 1 s here, grace 3 s) releases both; the addresses of Docker's network and container stay."""
    plugin.env.update(NETPLUGIN_GC_INTERVAL="1", NETPLUGIN_GC_GRACE="3")
    plugin.restart()
    proxy = CuttingProxy(plugin, "/IpamDriver.RequestPool", after_forwarding=True)
    try:
        res = docker("network", "create", "-d", proxy.name, "--ipam-driver", proxy.name, "--subnet",
                     "10.77.0.0/25", "-o", "parent=eth1", "cutpool", check=False)
        assert res.returncode != 0, "dockerd got no reply, yet created the network"
        assert plugin.state_rows("SELECT pool, refs FROM ipam_pools") == [("10.77.0.0/25", 1)]
        wait_until(lambda: plugin.state_rows("SELECT id FROM ipam_pools") == [], 30, "the pool reference released")
    finally:
        proxy.close()

    # the first RequestAddress is the network's gateway; the second, the container's, is cut
    proxy = CuttingProxy(plugin, "/IpamDriver.RequestAddress", nth=3, after_forwarding=True)
    try:
        docker("network", "create", "-d", proxy.name, "--ipam-driver", proxy.name, "--subnet", "10.77.0.0/25",
               "-o", "parent=eth1", "cutaddr")
        docker("run", "-d", "--name", "kept", "--network", "cutaddr", IMAGE, "sleep", "600")
        res = docker("run", "-d", "--name", "cut", "--network", "cutaddr", IMAGE, "sleep", "600", check=False)
        assert res.returncode != 0, "dockerd got no address, yet started the container"
        docker("rm", "-f", "cut", check=False)
        addresses = "SELECT addr FROM ipam_addresses WHERE kind = 'address'"
        assert len(plugin.state_rows(addresses)) == 2, "the container's address and the one nobody got"
        wait_until(lambda: len(plugin.state_rows(addresses)) == 1, 30, "the address nobody got released")
        kept = docker("inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", "kept").stdout
        time.sleep(5)  # more than the grace: what Docker's container and network hold stays
        assert len(plugin.state_rows(addresses)) == 1 and len(plugin.state_rows("SELECT id FROM ipam_pools")) == 1
        assert kept.strip() == "10.77.0.2"
    finally:
        docker("rm", "-f", "kept", "cut", check=False)
        docker("network", "rm", "cutaddr", check=False)
        proxy.close()



def test_a_mount_whose_reply_was_cut_is_released(docker, dockerd, volplugin):
    """A Mount the plugin carried out but whose reply a kill cut: dockerd re-sent it empty (refused) and
    failed the `docker run`, never learning the mount ID, so it never unmounts it; the volume stayed
    mounted and attached (on RBD: owned by this host) with no container. The garbage collection against
    Docker's containers (every 1 s here, grace 3 s) unmounts it; a running container's volume stays."""
    volplugin.env.update(VOLPLUGIN_GC_INTERVAL="1", VOLPLUGIN_GC_GRACE="3", VOLPLUGIN_DOCKER_HOST=dockerd.host)
    volplugin.restart()
    proxy = CuttingProxy(volplugin, "/VolumeDriver.Mount", after_forwarding=True)
    cut, kept = f"gc{secrets.token_hex(3)}", f"gc{secrets.token_hex(3)}"
    try:
        for name in (cut, kept):
            docker("volume", "create", "-d", proxy.name, "-o", "size=64M", "-o", "fs=ext4", name)
        res = docker("run", "-d", "--name", "cutvol", "-v", f"{cut}:/data", IMAGE, "sleep", "600", check=False)
        assert res.returncode != 0, "dockerd got no mount point, yet started the container"
        docker("rm", "-f", "cutvol", check=False)
        mounted = "SELECT volume FROM attachments"
        assert volplugin.state_rows(mounted) == [(cut,)], "the cut Mount left the volume mounted"
        docker("run", "-d", "--name", "keeps", "-v", f"{kept}:/data", IMAGE, "sleep", "600")
        wait_until(lambda: volplugin.state_rows(mounted) == [(kept,)], 30, "the volume nobody mounts released")
        time.sleep(5)  # more than the grace: the running container's volume stays
        assert volplugin.state_rows(mounted) == [(kept,)]
        docker("exec", "keeps", "touch", "/data/still-here")
    finally:
        docker("rm", "-f", "cutvol", "keeps", check=False)
        for name in (cut, kept):
            docker("volume", "rm", name, check=False)
        proxy.close()

"""Managed (v2) plugins end to end: the plugin directories of scripts/build-managed-plugins (config.json +
a debootstrapped rootfs; the base is cached in /var/cache/docker-db-plugins/managed, so only the first
build on a machine takes minutes) installed into a lab dockerd that runs in the emulated Docker host's
netns with its own data and exec roots, through the real CLI: ``docker plugin create / set / enable /
disable / push / upgrade / rm``.

- netplugin: the plugin runs in dockerd's network namespace (``network: host``), a static-mode network
  on the emulated physical network carries containers that reach each other, the router and host B;
  containers keep their connectivity while the plugin is disabled; an upgrade keeps networks and
  addresses (both ways Docker 20.10 offers: ``docker plugin upgrade`` from a registry, here a throwaway
  docker-registry inside the lab netns, and rm + create under the same name without one).
- volplugin: an RBD volume on the embedded single-node Ceph the plugin runs in its state directory,
  attached inside the plugin container with rbd-fuse + a loop device (this host's kernel has neither
  krbd nor nbd) and mounted under the propagatedMount; one container writes a file, the next reads it.
"""
from __future__ import annotations

import json
import os
import secrets
import sys
import time
from pathlib import Path

import pytest

from tests.lab import PLUGIN_DIR, mounts_under, remove_tree, sh
from tests.lab.dockerd import Dockerd
from tests.lab.image import IMAGE, build_busybox_tar
from tests.lab.managed import ManagedPlugin, Registry, build_plugins, build_skip_reason
from tests.lab.netns import Lab, build_physnet

pytestmark = pytest.mark.e2e
SUBNET, GW = "10.77.0.0/24", "10.77.0.1"


# --- fixtures -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """Both plugin directories, built once for the module (warm cache: seconds)."""
    reason = build_skip_reason()
    if reason:
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("managed")
    result = build_plugins(out / "v1")
    print(f"\nmanaged plugins: built in {result['seconds']:.1f} s\n{result['log']}", file=sys.stderr)
    yield result
    remove_tree(out)  # two root filesystems: not left in pytest's kept base temps


@pytest.fixture(scope="module")
def netplugin_v2(builds, tmp_path_factory):
    """A second build of netplugin, told apart by its label (the upgrade's target)."""
    out = tmp_path_factory.mktemp("managed-v2")
    result = build_plugins(out, "netplugin", label="v2")
    print(f"\nmanaged netplugin v2: built in {result['seconds']:.1f} s", file=sys.stderr)
    yield result["netplugin"]
    remove_tree(out)


@pytest.fixture(scope="module")
def mp_physnet():
    lab = Lab()
    try:
        yield build_physnet(lab)
    finally:
        lab.destroy()


@pytest.fixture(scope="module")
def mp_dockerd(mp_physnet, tmp_path_factory):
    """A dockerd of our own in the emulated Docker host's netns (not the shared e2e one: its per-test
    reset would throw managed plugins away)."""
    tar = build_busybox_tar(tmp_path_factory.mktemp("image") / "busybox.tar")
    daemon = Dockerd(mp_physnet.hosta, log_path=tmp_path_factory.mktemp("dockerd") / "dockerd.log")
    daemon.plugins = []
    try:
        daemon.start()
        daemon.import_image(tar, IMAGE)
        yield daemon
    finally:
        try:
            daemon.destroy()  # its containerd, shims and the plugins' processes go with it
        finally:
            for plugin in daemon.plugins:
                plugin.forget()


@pytest.fixture
def managed(mp_dockerd, mp_physnet):
    """make(name) -> a ManagedPlugin that is removed (with its containers, networks and volumes) after the
    test, whatever state it was left in."""
    made = []

    def make(name: str) -> ManagedPlugin:
        plugin = ManagedPlugin(mp_dockerd, name)
        made.append(plugin)
        mp_dockerd.plugins.append(plugin)
        return plugin

    yield make
    errors = []
    try:
        mp_dockerd.remove_all_containers(timeout=120)
        for volume in mp_dockerd.docker("volume", "ls", "-q").stdout.split():
            mp_dockerd.docker("volume", "rm", "-f", volume, check=False, timeout=120)
        mp_dockerd.remove_networks(timeout=60)
    except Exception as exc:  # noqa: BLE001 - the plugins must still go
        errors.append(f"docker cleanup: {exc}")
    for plugin in made:
        if plugin.id is None:
            continue
        proc = plugin.docker("rm", "-f", plugin.name, check=False, timeout=120)
        if proc.returncode != 0 and "no such plugin" not in proc.stderr.lower():
            errors.append(f"plugin rm -f {plugin.name}: {proc.stderr.strip()}")
        plugin.forget()
    mp_physnet.restore_hosta()
    if errors:
        mp_dockerd.recreate()  # a clean daemon for the next test; its plugins are gone with the old one
        pytest.fail("managed plugin teardown: " + "; ".join(errors))


def unique(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(3)}"


def on_failure_show(dockerd):
    """Print the dockerd log tail (the plugins' output is in it) if the block fails."""
    class _Show:
        def __enter__(self):
            return self

        def __exit__(self, exc_type, exc, tb):
            if exc_type is not None:
                print(f"--- dockerd log (tail) ---\n{dockerd.log_tail(120)}", file=sys.stderr)
            return False
    return _Show()


# --- netplugin ------------------------------------------------------------------------------------------

def create_net(docker, driver, name="pubnet", parent="eth1"):
    docker("network", "create", "-d", driver, "--ipam-driver", driver, "--subnet", SUBNET, "--gateway", GW,
           "-o", f"parent={parent}", name)


def run_container(docker, name, ip, network="pubnet", check=True):
    return docker("run", "-d", "--network", network, "--ip", ip, "--name", name, IMAGE, "sleep", "3600",
                  check=check)


def ping_from(docker, container, address) -> bool:
    return docker("exec", container, "ping", "-c", "1", "-W", "2", address, check=False).returncode == 0


def owned_links(physnet) -> list[str]:
    return sorted(n for n in physnet.lab.links(physnet.hosta) if n.startswith("np"))


def netns_inode(path: str) -> int:
    return os.stat(path).st_ino


def test_netplugin_managed_lifecycle_and_static_network(builds, mp_physnet, mp_dockerd, managed, tmp_path):
    docker, net = mp_dockerd.docker, mp_physnet
    plugin = managed(unique("mnp") + ":v1")
    driver = plugin.name
    with on_failure_show(mp_dockerd):
        plugin.create(builds["netplugin"])
        info = plugin.inspect()
        config = info["Config"]
        assert not info["Enabled"]
        assert config["Interface"]["Types"] == ["docker.networkdriver/1.0", "docker.ipamdriver/1.0"]
        assert config["Interface"]["Socket"] == "netplugin.sock"
        assert config["Network"]["Type"] == "host"
        assert "CAP_NET_ADMIN" in config["Linux"]["Capabilities"]

        state = tmp_path / "state"
        state.mkdir()
        plugin.set(f"state.source={state}", "NETPLUGIN_LOG_LEVEL=debug")
        settings = plugin.inspect()["Settings"]
        assert "NETPLUGIN_LOG_LEVEL=debug" in settings["Env"]
        assert [m["Source"] for m in settings["Mounts"] if m["Name"] == "state"] == [str(state)]

        started = time.monotonic()
        plugin.enable()
        print(f"\nnetplugin enable: {time.monotonic() - started:.2f} s", file=sys.stderr)
        proc = plugin.docker("set", plugin.name, "NETPLUGIN_LOG_LEVEL=info", check=False)
        assert proc.returncode != 0 and "disable" in proc.stderr  # settings only change while disabled

        # Docker's 20.10 runtime directory for managed plugins, whatever the daemon's --exec-root
        assert plugin.socket == Path(PLUGIN_DIR) / plugin.id / "netplugin.sock" and plugin.socket.is_socket()
        pid = plugin.pid()
        # network "host" = dockerd's namespace: the emulated Docker host, never the machine's own
        assert netns_inode(f"/proc/{pid}/ns/net") == netns_inode(f"/run/netns/{net.hosta}")
        assert netns_inode(f"/proc/{pid}/ns/net") != netns_inode("/proc/self/ns/net")
        assert (state / "netplugin.db").exists(), "state goes to the host directory"
        env = plugin.exec("cat", "/proc/1/environ").stdout.split("\0")
        assert "NETPLUGIN_LOG_LEVEL=debug" in env

        create_net(docker, driver)
        run_container(docker, "c1", "10.77.0.10")
        run_container(docker, "c2", "10.77.0.11")
        for target in ("10.77.0.11", GW, net.hostb_ip):
            assert ping_from(docker, "c1", target), f"c1 cannot reach {target}"
        assert net.lab.ping(net.hostb, "10.77.0.10"), "host B cannot reach the container"
        assert f"default via {GW}" in docker("exec", "c1", "ip", "route").stdout
        assert "NETPLUGIN-FORWARD" in net.lab.sh(net.hosta, ["iptables", "-S", "FORWARD"]).stdout
        assert len(owned_links(net)) == 3  # the bridge and two host-side veth ends

        # Disabling needs -f while a network uses the plugin; the containers stay connected.
        proc = plugin.docker("disable", plugin.name, check=False)
        assert proc.returncode != 0 and "in use" in proc.stderr
        plugin.disable(force=True)
        assert not plugin.enabled and not plugin.socket.exists()
        assert net.lab.ping(net.hostb, "10.77.0.10"), "traffic must not depend on the plugin process"
        plugin.enable()
        run_container(docker, "c3", "10.77.0.12")  # the plugin still knows the network ...
        assert ping_from(docker, "c3", "10.77.0.10")
        proc = run_container(docker, "c4", "10.77.0.10", check=False)  # ... and the addresses in use
        assert proc.returncode != 0 and "already in use" in proc.stderr

        docker("rm", "-f", "c1", "c2", "c3", "c4")
        docker("network", "rm", "pubnet")
        assert owned_links(net) == []
        assert "NETPLUGIN" not in net.lab.sh(net.hosta, ["iptables-save"]).stdout
        plugin.disable()
        plugin.rm()
        assert plugin.name not in plugin.docker("ls", "--format", "{{.Name}}").stdout
        assert not (Path(PLUGIN_DIR) / plugin.id).exists()


def test_netplugin_upgrade_keeps_networks_and_addresses(builds, netplugin_v2, mp_physnet, mp_dockerd, managed,
                                                         tmp_path):
    """Docker 20.10's `docker plugin upgrade` only fetches from a registry: the v2 build is pushed to a
    throwaway registry on 127.0.0.1 inside the lab netns and the disabled v1 plugin upgraded from it.
    Then the registry-free way: rm -f and create the next build under the same name."""
    reason = Registry.skip_reason()
    if reason:
        pytest.skip(reason)
    docker, net = mp_dockerd.docker, mp_physnet
    registry = Registry(net.hosta, tmp_path / "registry").start()
    try:
        with on_failure_show(mp_dockerd):
            repo = unique("mnp")
            pushed = managed(f"{registry.address}/lab/{repo}:v2")
            pushed.create(netplugin_v2)
            pushed.push()
            pushed.rm()

            plugin = managed(f"{repo}:v1")
            plugin.create(builds["netplugin"])
            state = tmp_path / "state"
            state.mkdir()
            plugin.set(f"state.source={state}")
            plugin.enable()
            create_net(docker, plugin.name)
            run_container(docker, "c1", "10.77.0.10")

            plugin.disable(force=True)  # a network uses it
            started = time.monotonic()
            out = plugin.upgrade(pushed.name).stdout
            print(f"\nnetplugin upgrade (pull from the lab registry): {time.monotonic() - started:.2f} s",
                  file=sys.stderr)
            assert "Upgraded plugin" in out
            info = plugin.inspect()
            assert info["PluginReference"] == pushed.name and info["Config"]["Description"].endswith("[v2]")
            # Docker 20.10 keeps the settings' env but takes mount sources from the new config: set again.
            state_mount = [m for m in info["Config"]["Mounts"] if m["Name"] == "state"][0]
            assert state_mount["Source"] == "/var/lib/netplugin"
            plugin.set(f"state.source={state}")
            plugin.enable()
            assert "label=v2" in plugin.exec("cat", "/etc/docker-db-plugins/build").stdout
            assert net.lab.ping(net.hostb, "10.77.0.10")
            run_container(docker, "c2", "10.77.0.11")
            assert ping_from(docker, "c2", "10.77.0.10")
            proc = run_container(docker, "c3", "10.77.0.10", check=False)
            assert proc.returncode != 0 and "already in use" in proc.stderr

            # Without a registry: remove the plugin (-f: a network uses it) and create the next build
            # under the same name; networks refer to the driver by name.
            plugin.disable(force=True)
            plugin.rm(force=True)
            plugin.create(builds["netplugin"])
            plugin.set(f"state.source={state}")
            plugin.enable()
            assert "label=" not in plugin.exec("cat", "/etc/docker-db-plugins/build").stdout
            assert net.lab.ping(net.hostb, "10.77.0.11")
            run_container(docker, "c4", "10.77.0.12")
            assert ping_from(docker, "c4", "10.77.0.10") and ping_from(docker, "c4", GW)

            docker("rm", "-f", "c1", "c2", "c3", "c4")
            docker("network", "rm", "pubnet")
            assert owned_links(net) == []
    finally:
        registry.destroy()


# --- volplugin ------------------------------------------------------------------------------------------

def loops_of(path_part: str) -> list[str]:
    out = sh(["losetup", "--list", "--noheadings", "--output", "NAME,BACK-FILE"], timeout=30).stdout
    return [line.split()[0] for line in out.splitlines() if path_part in line]


def test_volplugin_managed_rbd_volume_on_embedded_ceph(builds, mp_dockerd, managed, tmp_path):
    docker = mp_dockerd.docker
    plugin = managed(unique("mvp") + ":v1")
    state = tmp_path / "state"
    state.mkdir()
    volume = unique("vol")
    try:
        with on_failure_show(mp_dockerd):
            plugin.create(builds["volplugin"])
            config = plugin.inspect()["Config"]
            assert config["Interface"]["Types"] == ["docker.volumedriver/1.0"]
            assert config["PropagatedMount"] == "/mnt/volplugin"
            assert config["Linux"]["AllowAllDevices"] and "CAP_SYS_ADMIN" in config["Linux"]["Capabilities"]
            plugin.set(f"state.source={state}", "VOLPLUGIN_HOST_ID=hostA", "VOLPLUGIN_RBD_EMBEDDED_STORE_GIB=2",
                       "VOLPLUGIN_LOG_LEVEL=debug")
            started = time.monotonic()
            plugin.enable(timeout=180)
            # enable returns once the socket listens; the first start then creates the embedded cluster
            # before the workers answer (requests wait in the socket's backlog meanwhile)
            plugin.wait_serving(timeout=180)
            print(f"\nvolplugin enable + embedded Ceph created: {time.monotonic() - started:.2f} s",
                  file=sys.stderr)
            assert (state / "ceph").is_dir() and (state / "volplugin.db").exists()

            docker("volume", "create", "-d", plugin.name, "-o", "size=1G", "-o", "fs=ext4", volume, timeout=180)
            status = json.loads(docker("volume", "inspect", "--format", "{{json .Status}}", volume).stdout)
            assert status.get("backend") == "rbd", status
            docker("run", "--rm", "--network", "none", "-v", f"{volume}:/data", IMAGE, "sh", "-c",
                   "echo written-through-the-managed-plugin > /data/f && sync", timeout=180)
            out = docker("run", "--rm", "--network", "none", "-v", f"{volume}:/data", IMAGE, "cat", "/data/f",
                         timeout=180).stdout
            assert out.strip() == "written-through-the-managed-plugin"

            # While a container uses it: mounted under the propagated mount, attached with rbd-fuse + loop
            docker("run", "-d", "--name", "holder", "--network", "none", "-v", f"{volume}:/data", IMAGE,
                   "sleep", "3600", timeout=180)
            mountpoint = docker("volume", "inspect", "--format", "{{.Mountpoint}}", volume).stdout.strip()
            assert mountpoint == f"/mnt/volplugin/{volume}"
            host_side = Path(mp_dockerd.root) / "data" / "plugins" / plugin.id / "propagated-mount" / volume
            assert host_side.is_dir() and (host_side / "f").read_text().strip() == "written-through-the-managed-plugin"
            # admin commands run inside the plugin container (its mounts, state and configuration)
            admin = plugin.exec("/opt/docker-db-plugins/bin/volplugin", "status", "--json").stdout
            assert volume in admin and "hostA" in admin, admin
            records = [json.loads(p.read_text()) for p in (state / "rbd" / "attachments").rglob("*.json")]
            methods = [r["method"] for r in records]
            # this host's kernel has neither krbd nor nbd: rbd-fuse + a loop device inside the plugin
            assert methods == (["fuse"] if not os.path.exists("/sys/bus/rbd") else methods) and len(methods) == 1

            proc = docker("volume", "rm", volume, check=False)
            assert proc.returncode != 0 and "in use" in proc.stderr
            docker("rm", "-f", "holder", timeout=120)
            assert docker("volume", "inspect", "--format", "{{.Mountpoint}}", volume).stdout.strip() == ""
            docker("volume", "rm", volume, timeout=120)
            assert volume not in docker("volume", "ls", "-q").stdout
            plugin.disable()
            plugin.rm()
            assert not mounts_under(state), "nothing of the plugin stays mounted on the host"
    finally:
        # whatever a failure left: the embedded cluster's daemons die with the plugin container (its
        # PID namespace); loop devices of its FUSE files do not
        for device in loops_of(volume):
            sh(["losetup", "--detach", device], check=False, timeout=30)
        if mounts_under(state):
            remove_tree(state)

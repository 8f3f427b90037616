"""Swarm services on netplugin networks and volplugin volumes, through a real single-node swarm: a lab
dockerd (no --live-restore: swarm refuses it) in the emulated Docker host's netns, `docker swarm init` on an
address of that netns only, the MANAGED netplugin (swarm refuses legacy network and IPAM plugins) set to
scope global, and the legacy volplugin socket on the shared test Ceph (swarm accepts legacy volume plugins).

- The example stack (examples/swarm/stack.yml): PostgreSQL keeps its rows across `service update --force`
  and across `stack rm` + deploy; the client reaches it by service name (dnsrr) and scales.
- A scaled service shares its volume on the node; a start-first update (the new task's Mount before the old
  task's Unmount) never unmounts the new task's volume.
- Global scope as Docker expects: AllocateNetwork on the manager when the network is made (the options
  reach every node's CreateNetwork), FreeNetwork when it goes; volumes report Scope global.
"""
from __future__ import annotations

import ipaddress
import json
import re
import secrets
import sys
import time
from types import SimpleNamespace

import pytest

from tests.lab import REPO_ROOT, remove_tree, wait_until
from tests.lab.dockerd import Dockerd
from tests.lab.image import IMAGE, build_busybox_tar
from tests.lab.managed import ManagedPlugin, build_plugins, build_skip_reason
from tests.lab.netns import Lab, build_physnet
from tests.lab.pgimage import build_postgres_tar, import_postgres, psql, wait_pg_ready
from tests.lab.pgimage import skip_reason as pg_skip_reason
from tests.lab.plugin import Plugin, rbd_volplugin
from tests.lab.swarm import Swarm, teardown

pytestmark = pytest.mark.e2e
STACK = REPO_ROOT / "examples" / "swarm" / "stack.yml"
SUBNET, GW = "10.77.0.0/24", "10.77.0.1"


# --- fixtures -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sw(ceph, tmp_path_factory):
    """The swarm, its two plugins and the emulated physical network, for the whole module."""
    for reason in (build_skip_reason(), pg_skip_reason()):
        if reason:
            pytest.skip(reason)
    work = tmp_path_factory.mktemp("swarm")
    build = build_plugins(work / "build", "netplugin")
    lab = Lab()
    daemon = volplugin = swarm = netplugin = None
    try:
        physnet = build_physnet(lab)  # its own: the e2e hygiene would delete the swarm's links
        daemon = Dockerd(physnet.hosta, log_path=work / "dockerd.log", live_restore=False).start()
        daemon.import_image(build_busybox_tar(work / "busybox.tar"), IMAGE)
        pg_image = import_postgres(daemon, build_postgres_tar(work / "postgres.tar"))
        swarm = Swarm(daemon, lab, physnet.hosta).init()

        netplugin = ManagedPlugin(daemon, f"swnp{secrets.token_hex(3)}:v1").create(build["netplugin"])
        (work / "np-state").mkdir()
        netplugin.set(f"state.source={work / 'np-state'}", "NETPLUGIN_CLUSTER_SCOPE=global")
        netplugin.enable()

        volplugin = rbd_volplugin(work, ceph, prefix="swvp")
        volplugin.start()
        # dockerd loads a legacy volume plugin on first use; only then does the node report it to the
        # scheduler (a service needing it would stay "Pending: missing plugin on 1 node")
        daemon.docker("volume", "ls", "--filter", f"driver={volplugin.name}")
        waited = swarm.wait_node_plugins({("Network", netplugin.name), ("Volume", volplugin.name)})
        print(f"\nswarm: node reported both plugins after {waited:.1f} s", file=sys.stderr)
        yield SimpleNamespace(docker=daemon.docker, dockerd=daemon, swarm=swarm, np=netplugin, vp=volplugin,
                              physnet=physnet, pg_image=pg_image, np_state=work / "np-state")
    finally:
        teardown(daemon, swarm, [netplugin] if netplugin else [])
        if volplugin is not None:
            volplugin.destroy()
        lab.destroy()
        remove_tree(work / "build")


@pytest.fixture
def network(sw):
    """A swarm-scoped static network on the emulated physical network; removed after the test."""
    name = f"swnet{secrets.token_hex(3)}"
    sw.docker("network", "create", "-d", sw.np.name, "--ipam-driver", sw.np.name, "--scope", "swarm",
              "--subnet", SUBNET, "--gateway", GW, "-o", "parent=eth1", "-o", "egress=80mbit", name)
    yield name
    for service in sw.docker("service", "ls", "-q").stdout.split():
        sw.docker("service", "rm", service, check=False)
        sw.swarm.wait_gone(service)
    sw.docker("network", "rm", name, check=False)


# --- helpers --------------------------------------------------------------------------------------------

def plugin_calls(sw, endpoint: str) -> list[str]:
    """Lines of the managed netplugin's request log (in dockerd's log) for ``endpoint`` answered 200."""
    return [ln for ln in sw.dockerd.log.read_text(errors="replace").splitlines()
            if sw.np.id in ln and f"POST /NetworkDriver.{endpoint} 200" in ln]


def np_status(sw) -> dict:
    out = sw.np.exec("/opt/docker-db-plugins/bin/netplugin", "status", "--json").stdout
    return json.loads(out)


def address_of(sw, container: str, network: str) -> str:
    nets = json.loads(sw.docker("inspect", "-f", "{{json .NetworkSettings.Networks}}", container).stdout)
    return nets[network]["IPAddress"]


def volume_status(sw, volume: str) -> dict:
    return sw.vp.call("/VolumeDriver.Get", {"Name": volume})["Volume"]


def volume_calls(sw, volume: str) -> list[tuple[str, str]]:
    """[(Mount|Unmount, caller ID)] for ``volume`` in the order volplugin answered them."""
    pattern = re.compile(r"POST /VolumeDriver\.(Mount|Unmount) 200 \S+ Name=(\S+) ID=(\S+)")
    return [(m[1], m[3]) for m in map(pattern.search, sw.vp.log.read_text(errors="replace").splitlines())
            if m and m[2] == volume]


# --- tests ----------------------------------------------------------------------------------------------

def test_stack_example_keeps_the_database_across_update_and_redeploy(sw, network):
    docker, swarm = sw.docker, sw.swarm
    stack = f"pg{secrets.token_hex(2)}"
    db, client, volume = f"{stack}_db", f"{stack}_client", f"{stack}_pgdata"
    env = {"PG_IMAGE": sw.pg_image, "VOLPLUGIN": sw.vp.name, "NETWORK": network, "PG_SIZE": "1G",
           "CLIENT_REPLICAS": "2"}
    # Global scope: the manager allocated the network once, and returned the user's options with it.
    wait_until(lambda: plugin_calls(sw, "AllocateNetwork"), 60, "AllocateNetwork (the manager's allocator runs "
               "after `network create` returns)", interval=0.5)

    def deploy():
        docker("stack", "deploy", "--resolve-image", "never", "-c", str(STACK), stack, env=env, timeout=120)
        [container] = swarm.wait_running(db, 1)
        wait_pg_ready(docker, container, timeout=120)
        return container

    started = time.monotonic()
    container = deploy()
    print(f"\nstack deploy -> postgres ready: {time.monotonic() - started:.1f} s", file=sys.stderr)
    psql(docker, container, "CREATE TABLE t (n int); INSERT INTO t SELECT generate_series(1, 100)")
    address = address_of(sw, container, network)
    assert ipaddress.ip_address(address) in ipaddress.ip_network(SUBNET)
    assert sw.physnet.lab.ping(sw.physnet.hostb, address), "host B reaches the database task"
    vol = json.loads(docker("volume", "inspect", volume).stdout)[0]
    assert (vol["Driver"], vol["Scope"], vol["Status"]["backend"]) == (sw.vp.name, "global", "rbd")
    # the node's CreateNetwork got the user's options back from AllocateNetwork's reply (swarm passes on
    # the reply, not the request)
    network_id = docker("network", "inspect", "-f", "{{.Id}}", network).stdout.strip()
    [net] = [n for n in np_status(sw)["networks"] if n["id"] == network_id]
    assert net["parent"] == "eth1" and "egress" in net["options"], net
    # the client finds the database by service name (dnsrr: the task's own address) and scales
    clients = swarm.wait_running(client, 2)
    wait_until(lambda: "db:5432 - accepting connections" in docker("logs", clients[0]).stdout, 60,
               "the client's pg_isready -h db", interval=0.5)
    docker("service", "scale", "--detach", f"{client}=3")
    clients = swarm.wait_running(client, 3)
    addresses = {address_of(sw, c, network) for c in clients} | {address}
    assert len(addresses) == 4, addresses

    docker("service", "update", "--detach", "--force", db)  # stop-first: old Unmount, then new Mount
    swarm.wait_update(db)
    [replaced] = swarm.wait_running(db, 1)
    assert replaced != container
    wait_pg_ready(docker, replaced, timeout=120)
    assert psql(docker, replaced, "SELECT count(*), sum(n) FROM t") == "100|5050"

    docker("stack", "rm", stack)
    swarm.wait_gone(db), swarm.wait_gone(client)
    assert volume in docker("volume", "ls", "-q").stdout.split()  # the data stays
    assert volume_status(sw, volume)["Mountpoint"] == ""
    assert np_status(sw)["endpoints"] == []

    container = deploy()  # again: the same volume, the same rows
    assert psql(docker, container, "SELECT count(*) FROM t") == "100"
    docker("stack", "rm", stack)
    swarm.wait_gone(db), swarm.wait_gone(client)
    docker("volume", "rm", volume, timeout=120)
    assert volume not in docker("volume", "ls", "-q").stdout.split()


def test_scaled_service_shares_its_volume_and_start_first_update_keeps_it(sw, network):
    docker, swarm = sw.docker, sw.swarm
    service, volume = f"app{secrets.token_hex(2)}", f"appdata{secrets.token_hex(2)}"
    docker("service", "create", "--detach", "--no-resolve-image", "--name", service, "--network", network,
           "--mount", f"type=volume,source={volume},destination=/data,volume-driver={sw.vp.name},"
                      "volume-opt=size=1G,volume-opt=fs=ext4",
           IMAGE, "sh", "-c", "hostname >> /data/members; exec sleep 3600")
    swarm.wait_running(service, 1)
    docker("service", "scale", "--detach", f"{service}=3")
    tasks = swarm.wait_running(service, 3)
    # one volume, mounted once on this node for all three tasks
    wait_until(lambda: len(docker("exec", tasks[0], "cat", "/data/members").stdout.split()) == 3, 60, "3 members",
               interval=0.5)
    status = volume_status(sw, volume)
    assert len(status["Status"]["containers"]) == 3 and status["Mountpoint"]
    addresses = [address_of(sw, t, network) for t in tasks]
    assert docker("exec", tasks[0], "ping", "-c", "1", "-W", "2", addresses[1], check=False).returncode == 0

    docker("service", "scale", "--detach", f"{service}=1")
    [task] = swarm.wait_running(service, 1)
    status = volume_status(sw, volume)
    assert len(status["Status"]["containers"]) == 1 and status["Mountpoint"]

    calls_before = len(volume_calls(sw, volume))
    docker("service", "update", "--detach", "--update-order", "start-first", "--force", service)
    swarm.wait_update(service)
    [new] = swarm.wait_running(service, 1)
    assert new != task
    calls = volume_calls(sw, volume)[calls_before:]
    assert [c[0] for c in calls] == ["Mount", "Unmount"], f"start-first: the new task mounts first: {calls}"
    # the old task's Unmount came after the new task's Mount: the volume stays mounted for the new task
    status = volume_status(sw, volume)
    [holder] = status["Status"]["containers"]
    assert status["Mountpoint"] and holder.startswith(calls[0][1]) and not holder.startswith(calls[1][1])
    docker("exec", new, "sh", "-c", "echo after-update >> /data/members && sync")
    assert len(docker("exec", new, "cat", "/data/members").stdout.split()) == 5  # 3 + the new task + the line

    docker("service", "rm", service)
    swarm.wait_gone(service)
    assert volume_status(sw, volume)["Mountpoint"] == ""
    docker("volume", "rm", volume, timeout=120)


def test_network_lifecycle_allocates_and_frees_on_the_manager(sw):
    docker = sw.docker
    name = f"swnet{secrets.token_hex(3)}"
    allocated, freed = len(plugin_calls(sw, "AllocateNetwork")), len(plugin_calls(sw, "FreeNetwork"))
    docker("network", "create", "-d", sw.np.name, "--ipam-driver", sw.np.name, "--scope", "swarm",
           "--subnet", SUBNET, "--gateway", GW, "-o", "parent=eth1", name)
    wait_until(lambda: len(plugin_calls(sw, "AllocateNetwork")) == allocated + 1, 60, "AllocateNetwork", interval=0.5)
    docker("network", "rm", name)
    wait_until(lambda: len(plugin_calls(sw, "FreeNetwork")) == freed + 1, 60, "FreeNetwork", interval=0.5)
    status = np_status(sw)
    assert status["networks"] == [] and status["pools"] == []


def test_legacy_network_plugin_is_refused_in_swarm(sw, tmp_path):
    legacy = Plugin(sw.physnet.hosta, tmp_path / "legacy")
    try:
        legacy.start()
        proc = sw.docker("network", "create", "-d", legacy.name, "--scope", "swarm", "--subnet", SUBNET,
                         "-o", "parent=eth1", "legacynet", check=False)
        assert proc.returncode != 0 and "legacy plugin" in proc.stderr, proc.stderr
    finally:
        legacy.destroy()


def test_local_scope_plugin_serves_swarm_through_a_config_only_network(sw):
    """Scope local (the default without etcd): swarm neither allocates nor passes options; each node takes
    them from its own config-only network (`--config-from`), as for Docker's macvlan."""
    docker, swarm, np = sw.docker, sw.swarm, sw.np
    config, name, service = (f"swcfg{secrets.token_hex(2)}", f"swloc{secrets.token_hex(2)}",
                             f"loc{secrets.token_hex(2)}")
    np.disable()
    np.set("NETPLUGIN_CLUSTER_SCOPE=local")
    np.enable()
    try:
        assert np.call("/NetworkDriver.GetCapabilities")["Scope"] == "local"
        swarm.wait_node_plugins({("Network", np.name)})
        allocated = len(plugin_calls(sw, "AllocateNetwork"))
        docker("network", "create", "--config-only", "--ipam-driver", np.name, "--subnet", SUBNET, "--gateway", GW,
               "-o", "parent=eth1", config)
        docker("network", "create", "-d", np.name, "--scope", "swarm", "--config-from", config, name)
        docker("service", "create", "--detach", "--no-resolve-image", "--name", service, "--network", name,
               "--replicas", "2", IMAGE, "sleep", "3600")
        tasks = swarm.wait_running(service, 2)
        addresses = [address_of(sw, t, name) for t in tasks]
        assert all(ipaddress.ip_address(a) in ipaddress.ip_network(SUBNET) for a in addresses), addresses
        for address in addresses:
            assert sw.physnet.lab.ping(sw.physnet.hostb, address), f"host B reaches {address}"
        assert len(plugin_calls(sw, "AllocateNetwork")) == allocated, "a local-scope driver is not allocated"
        docker("service", "rm", service)
        swarm.wait_gone(service)
        docker("network", "rm", name)
        # the node drops its copy of the network asynchronously; until then the config network is "in use"
        wait_until(lambda: docker("network", "rm", config, check=False).returncode == 0, 60, f"network rm {config}",
                   interval=0.5)
        assert np_status(sw)["networks"] == []
    finally:
        np.disable(force=True)
        np.set("NETPLUGIN_CLUSTER_SCOPE=global")
        np.enable()

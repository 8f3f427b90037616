"""Static mode through a real dockerd on the emulated physical network (switch, router 10.77.0.1,
host B 10.77.0.50, Docker host A with parents eth1/eth2)."""
import json
import signal
import subprocess
import sys

import pytest

from tests.lab.image import IMAGE

pytestmark = pytest.mark.e2e
SUBNET, GW = "10.77.0.0/24", "10.77.0.1"


def status(plugin) -> dict:
    proc = subprocess.run([sys.executable, "-m", "netplugin", "status", "--json", "--state-dir",
                           str(plugin.state_dir)], capture_output=True, text=True, timeout=30, check=True)
    return json.loads(proc.stdout)


def owned_links(physnet) -> list[str]:
    return sorted(n for n in physnet.lab.links(physnet.hosta) if n.startswith("np"))


def iptables_save(physnet) -> str:
    return physnet.lab.sh(physnet.hosta, ["iptables-save"]).stdout


def create_net(docker, plugin, name="pubnet", *extra, parent="eth1", ipam=True, check=True):
    argv = ["network", "create", "-d", plugin.name]
    if ipam:
        argv += ["--ipam-driver", plugin.name]
    argv += ["--subnet", SUBNET, "--gateway", GW, "-o", f"parent={parent}", *extra, name]
    return docker(*argv, check=check)


def run_container(docker, name, ip, network="pubnet", check=True):
    return docker("run", "-d", "--network", network, "--ip", ip, "--name", name, IMAGE, "sleep", "3600",
                  check=check)


def ping_from(docker, container, address):
    return docker("exec", container, "ping", "-c", "1", "-W", "2", address, check=False).returncode == 0


def assert_nothing_left(physnet, plugin):
    assert owned_links(physnet) == []
    assert "NETPLUGIN" not in iptables_save(physnet)
    state = status(plugin)
    assert state["networks"] == [] and state["endpoints"] == [] and state["pools"] == []
    assert "master" not in physnet.lab.sh(physnet.hosta, ["ip", "-o", "link", "show", "eth1"]).stdout


def test_containers_sit_on_the_physical_network(physnet, docker, plugin):
    create_net(docker, plugin)
    run_container(docker, "c1", "10.77.0.10")
    run_container(docker, "c2", "10.77.0.11")
    for target in ("10.77.0.11", GW, physnet.hostb_ip):
        assert ping_from(docker, "c1", target), f"c1 cannot reach {target}"
    assert physnet.lab.ping(physnet.hostb, "10.77.0.10"), "host B cannot reach the container"

    routes = docker("exec", "c1", "ip", "route").stdout
    assert f"default via {GW}" in routes
    links = docker("exec", "c1", "ip", "-o", "link").stdout
    assert len([l for l in links.splitlines() if "eth" in l.split(":")[1]]) == 1, "no docker_gwbridge"
    assert "02:4e:0a:4d:00:0a" in docker("exec", "c1", "ip", "link", "show", "eth0").stdout

    # No NAT: the router learned the container's own MAC for its own address, and no NAT rule exists.
    assert "02:4e:0a:4d:00:0a" in physnet.lab.sh(physnet.router, ["ip", "neigh", "show", "10.77.0.10"]).stdout
    assert "MASQUERADE" not in iptables_save(physnet) and "SNAT" not in iptables_save(physnet)

    docker("rm", "-f", "c2")  # releases 10.77.0.11 ...
    run_container(docker, "c3", "10.77.0.11")  # ... so it can be given again
    assert ping_from(docker, "c3", GW)
    docker("rm", "-f", "c1", "c3")
    docker("network", "rm", "pubnet")
    assert_nothing_left(physnet, plugin)


def test_docker_default_ipam(physnet, docker, plugin):
    create_net(docker, plugin, "defipam", ipam=False)
    run_container(docker, "c1", "10.77.0.20", network="defipam")
    assert ping_from(docker, "c1", GW) and ping_from(docker, "c1", physnet.hostb_ip)
    docker("rm", "-f", "c1")
    docker("network", "rm", "defipam")
    assert owned_links(physnet) == [] and status(plugin)["networks"] == []


@pytest.mark.parametrize("options, message", [
    ([], "needs -o parent"),
    (["-o", "parent=nope0"], "nope0 does not exist"),
    (["-o", "parent=eth1", "-o", "com.docker.network.driver.mtu=big"], "not a number"),
    (["-o", "parent=eth1", "-o", "com.docker.network.driver.mtu=9000"], "exceeds parent eth1"),
    (["-o", "parent=eth1", "-o", "flavour=spicy"], "unknown network option flavour"),
    (["-o", "parent=eth1", "-o", "mode=teleport"], "unknown mode"),
])
def test_bad_network_options_fail_through_the_cli(physnet, docker, plugin, options, message):
    argv = ["network", "create", "-d", plugin.name, "--ipam-driver", plugin.name, "--subnet", SUBNET,
            "--gateway", GW, *options, "badnet"]
    proc = docker(*argv, check=False)
    assert proc.returncode != 0 and message in proc.stderr
    assert "badnet" not in docker("network", "ls", "--format", "{{.Name}}").stdout
    assert_nothing_left(physnet, plugin)


def test_parent_in_use_and_address_conflicts(physnet, docker, plugin):
    create_net(docker, plugin)
    proc = create_net(docker, plugin, "second", check=False)
    assert proc.returncode != 0 and "eth1 is already used" in proc.stderr
    run_container(docker, "c1", "10.77.0.10")
    proc = run_container(docker, "c2", "10.77.0.10", check=False)
    assert proc.returncode != 0 and "10.77.0.10 is already in use" in proc.stderr
    proc = run_container(docker, "c3", "10.99.0.10", check=False)
    assert proc.returncode != 0 and "10.99.0.10" in proc.stderr
    docker("rm", "-f", "c1", "c2", "c3", check=False)
    docker("network", "rm", "pubnet")
    assert_nothing_left(physnet, plugin)


def test_plugin_kill_9_keeps_containers_connected(physnet, docker, plugin):
    create_net(docker, plugin)
    run_container(docker, "c1", "10.77.0.10")
    plugin.kill(signal.SIGKILL)
    assert physnet.lab.ping(physnet.hostb, "10.77.0.10"), "traffic must not depend on the plugin process"
    plugin.start()
    assert ping_from(docker, "c1", GW)
    run_container(docker, "c2", "10.77.0.11")  # the restarted plugin still knows the network
    proc = run_container(docker, "c3", "10.77.0.10", check=False)  # ... and the addresses in use
    assert proc.returncode != 0 and "already in use" in proc.stderr
    docker("rm", "-f", "c1", "c2", "c3", check=False)
    docker("network", "rm", "pubnet")
    assert_nothing_left(physnet, plugin)


def test_dockerd_restart_keeps_containers_connected(physnet, docker, dockerd, plugin):
    create_net(docker, plugin)
    run_container(docker, "c1", "10.77.0.10")
    dockerd.restart()  # --live-restore: the container keeps running
    assert physnet.lab.ping(physnet.hostb, "10.77.0.10")
    assert ping_from(docker, "c1", GW)
    docker("rm", "-f", "c1")
    docker("network", "rm", "pubnet")
    assert_nothing_left(physnet, plugin)


def test_status_names_networks_and_containers_through_docker(physnet, docker, dockerd, plugin):
    """`netplugin status` in the plugin's netns with the lab's dockerd: Docker's names, no drift."""
    from tests.lab import NETNS_DIR, NSENTER, REPO_ROOT

    create_net(docker, plugin)
    run_container(docker, "c1", "10.77.0.10")
    proc = subprocess.run([NSENTER, f"--net={NETNS_DIR}/{dockerd.netns}", sys.executable, "-m", "netplugin",
                           "status", "--json", "--state-dir", str(plugin.state_dir), "--docker-host", dockerd.host],
                          capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert [n["name"] for n in report["networks"]] == ["pubnet"] and report["docker"]["error"] == ""
    [ep] = report["endpoints"]
    assert (ep["container"], ep["address"], ep["joined"]) == ("c1", "10.77.0.10/24", True)
    assert [(p["pool"], p["in_use"], p["size"]) for p in report["pools"]] == [(SUBNET, 2, 254)]  # gateway + c1
    assert report["drift"] == []
    docker("rm", "-f", "c1")
    docker("network", "rm", "pubnet")
    assert_nothing_left(physnet, plugin)

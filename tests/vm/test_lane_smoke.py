"""The VM lane itself: the kernel features the VLAN and SR-IOV work relies on are there, the
checkout's venv works inside, and results come back to the host through the shared directory."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.vm
REPO = Path(__file__).resolve().parents[2]


def _link(vm, name: str, netns: str | None = None) -> dict:
    out = vm.run("ip", *(["-n", netns] if netns else []), "-d", "-j", "link", "show", name).stdout
    return json.loads(out)[0]


def test_modules_load(vm):
    wanted = ["8021q", "bridge", "veth", "dm_thin_pool", "rbd", "nbd", "igb", "igbvf"]
    vm.modprobe(*wanted)
    missing = [m for m in wanted if not Path("/sys/module", m.replace("-", "_")).is_dir()]
    assert not missing, f"modules not loaded: {missing}"


def test_vlan_subinterfaces_on_a_veth_carry_tagged_traffic(vm, netns):
    vm.modprobe("8021q")
    a, b = netns(), netns()
    vm.ip_batch(f"link add v0 type veth peer name v1 netns {b}\n"
             "link add link v0 name v0.100 type vlan id 100\n"
             "addr add 10.100.0.1/24 dev v0.100\n"
             "link set v0 up\nlink set v0.100 up\n", netns=a)
    vm.ip_batch("link add link v1 name v1.100 type vlan id 100\n"
             "addr add 10.100.0.2/24 dev v1.100\n"
             "link set v1 up\nlink set v1.100 up\n", netns=b)
    info = _link(vm, "v0.100", a)["linkinfo"]
    assert info["info_kind"] == "vlan" and info["info_data"]["id"] == 100
    vm.run("ip", "netns", "exec", a, "ping", "-c", "1", "-W", "5", "10.100.0.2")


def test_bridge_vlan_filtering(vm, netns):
    ns = netns()
    vm.ip_batch("link add br0 type bridge vlan_filtering 1\n"
             "link add p0 type veth peer name p1\n"
             "link set p0 master br0\n"
             "link set br0 up\nlink set p0 up\n", netns=ns)
    assert _link(vm, "br0", ns)["linkinfo"]["info_data"]["vlan_filtering"] == 1
    bridge = ("ip", "netns", "exec", ns, "bridge")
    vm.run(*bridge, "vlan", "add", "dev", "p0", "vid", "10", "pvid", "untagged")
    vlans = json.loads(vm.run(*bridge, "-j", "vlan", "show", "dev", "p0").stdout)
    assert any(v.get("vlan") == 10 for entry in vlans for v in entry["vlans"]), vlans


def test_dm_thin_pool_without_udev(vm, tmp_path):
    vm.modprobe("dm_thin_pool", "loop")
    assert Path("/dev/mapper/control").exists() and Path("/dev/loop-control").exists()
    assert os.environ.get("DM_DISABLE_UDEV") == "1"
    if not os.path.exists("/usr/sbin/dmsetup") and not os.path.exists("/sbin/dmsetup"):
        pytest.skip("dmsetup not installed (the module loads; creating a pool needs dmsetup)")
    meta, data = tmp_path / "meta", tmp_path / "data"
    meta.write_bytes(b"\0" * (4 << 20))
    with open(data, "wb") as f:
        f.truncate(64 << 20)
    loops = [vm.run("losetup", "-f", "--show", str(p)).stdout.strip() for p in (meta, data)]
    pool = f"vmtpool{os.getpid()}"
    try:
        # 64 MiB data (131072 sectors), 64 KiB blocks (128 sectors), low water mark 0
        table = f"0 131072 thin-pool {loops[0]} {loops[1]} 128 0"
        vm.run("dmsetup", "create", pool, "--table", table)
        vm.run("dmsetup", "message", pool, "0", "create_thin 0")
        vm.run("dmsetup", "create", f"{pool}t", "--table", f"0 65536 thin /dev/mapper/{pool} 0")
        assert "thin-pool" in vm.run("dmsetup", "status", pool).stdout
    finally:
        vm.run("dmsetup", "remove", f"{pool}t", check=False)
        vm.run("dmsetup", "remove", pool, check=False)
        for loop in loops:
            vm.run("losetup", "-d", loop, check=False)


def _vf_netdevs(pf: str) -> list[str]:
    return sorted(net.name for net in Path(f"/sys/class/net/{pf}/device").glob("virtfn*/net/*"))


def _wait(what: str, predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f}s waiting for {what}"
        time.sleep(0.2)


def test_igb_sriov_vf_reaches_the_wire_peer(vm, igb_pf, wire_peer, netns):
    device = Path(f"/sys/class/net/{igb_pf}/device")
    assert int((device / "sriov_totalvfs").read_text()) > 0
    # Order matters: enabling VFs resets the PF, and a VF driver that probes while the PF is down
    # or resetting gives up ("PF still in reset state") with a random MAC and no carrier. So VFs
    # are not bound automatically (igbvf may be loaded already); they are probed once the PF has
    # its carrier and the VF its MAC.
    (device / "sriov_drivers_autoprobe").write_text("0\n")
    (device / "sriov_numvfs").write_text("2\n")
    try:
        vm.run("ip", "link", "set", igb_pf, "up")
        carrier = Path(f"/sys/class/net/{igb_pf}/carrier")
        _wait("the PF's carrier", lambda: carrier.read_text().strip() == "1")
        vm.run("ip", "link", "set", igb_pf, "vf", "0", "mac", "02:4e:00:00:00:10")
        vm.modprobe("igbvf")  # no udev: nothing loads the VF driver otherwise
        (device / "sriov_drivers_autoprobe").write_text("1\n")  # VFs may bind from now on
        for vf in sorted(device.glob("virtfn*")):
            Path("/sys/bus/pci/drivers_probe").write_text(vf.resolve().name)
        _wait("2 VF netdevs", lambda: len(_vf_netdevs(igb_pf)) == 2)
        vf0 = next((device / "virtfn0" / "net").iterdir()).name
        mac = Path(f"/sys/class/net/{vf0}/address").read_text().strip()
        assert mac == "02:4e:00:00:00:10", vm.run("dmesg").stdout[-3000:]

        # A "container" on VF 0 and the peer NIC in another netns: frames cross the emulated wire.
        container, peer = netns(), netns()
        vm.ip_batch(f"link set {vf0} netns {container}\nlink set {wire_peer} netns {peer}\n")
        vm.ip_batch(f"addr add 10.99.0.1/24 dev {vf0}\nlink set {vf0} up\n", netns=container)
        vm.ip_batch(f"addr add 10.99.0.2/24 dev {wire_peer}\nlink set {wire_peer} up\n",
                    netns=peer)
        ping = ("ip", "netns", "exec", container, "ping", "-c", "1", "-W", "1", "10.99.0.2")
        _wait("VF 0 -> wire peer ping", lambda: vm.run(*ping, check=False).returncode == 0)
    finally:
        (device / "sriov_numvfs").write_text("0\n")
        (device / "sriov_drivers_autoprobe").write_text("1\n")


def test_the_checkouts_venv_imports_netplugin(vm):
    assert Path(sys.prefix).resolve() == (REPO / ".venv").resolve(), sys.prefix
    import netplugin

    assert Path(netplugin.__file__).resolve().is_relative_to(REPO)


def test_results_dir_is_shared_with_the_host(vm_results):
    marker = vm_results / "vm-lane-smoke.txt"
    marker.write_text(f"written inside the VM lane, kernel {os.uname().release}\n")
    assert marker.read_text().startswith("written inside the VM lane")

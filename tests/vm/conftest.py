"""The VM suite: tests that need kernel features this host's kernel lacks (802.1Q VLANs, bridge
vlan_filtering, device-mapper thin pools, krbd/nbd, an SR-IOV NIC). They run inside the VM lane, a
stock Debian kernel under QEMU that sees the host's / read-only (so this checkout and its .venv):

    bash scripts/test-vm [pytest args]      # one VM boot for the whole of tests/vm

A test that needs the VM says so with ``@pytest.mark.vm`` (or ``pytestmark``) or by using one of
the fixtures below: on the host it is then skipped with the reason; tests here without either also
run on the host (parsing, inventories, fake sysfs). Inside the lane the guest is throwaway (root
filesystem writes land in a tmpfs overlay), but all tests share one VM: clean up what you create
and name it uniquely (``vm.unique()``).

What the guest does NOT have (vm/README.md): udev. Load modules yourself (``vm.modprobe()``; the
kernel's own request_module works too); nodes for not-yet-loaded modules exist (/dev/loop-control,
/dev/mapper/control, /dev/net/tun); DM_DISABLE_UDEV=1 is set for LVM/dmsetup; the NICs present at
boot have their drivers, but devices that appear later get none unless you load it
(``vm.modprobe("igbvf")`` after enabling VFs). Process spawns cost ~50-100 ms under software
emulation: prefer netlink (pyroute2) or one ``vm.ip_batch()`` over many ``ip`` calls.

Fixtures (each skips on the host):
    vm          helpers: vm.run(*argv), vm.modprobe(*modules), vm.ip_batch(text, netns=None),
                vm.unique(prefix)
    vm_results  the writable results directory shared with the host (NETPLUGIN_VM_RESULTS)
    igb_pf      the igb NIC's PF netdev (SR-IOV capable; skips unless the lane ran with --igb)
    wire_peer   the virtio-net NIC on the same emulated wire (a QEMU hub) as the igb PF
    netns       a factory of throwaway network namespaces, removed after the test
    wire        (PF, peer netns, netns factory): the igb PF with no VFs enabled, and the wire peer
                NIC moved into its own namespace with WIRE_PEER_IP/24; VFs disabled afterwards
    lvm_pool    (module) a loop-backed volume group with a thin pool on 1 GiB (tests/lab/lvm.py),
                removed with everything in it afterwards
"""
from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

import pytest

# scripts/vm-lane sets NETPLUGIN_VM_LANE=1 in the guest; /run/vm-lane is the guest init's own
# directory (a tmpfs in the guest), so an exported variable alone never makes the host "the VM".
IN_VM_LANE = os.environ.get("NETPLUGIN_VM_LANE") == "1" and os.path.isfile("/run/vm-lane/vm.conf")
WIRE_PEER_IP = "10.79.0.1"
SKIP_REASON = "needs 8021q/bridge vlan_filtering/igb: runs in the VM lane, scripts/test-vm"
MARKER = "vm: needs kernel features the host lacks (8021q, vlan_filtering, dm-thin, SR-IOV igb): " \
         "runs in the VM lane (scripts/test-vm), skipped on the host"


def pytest_configure(config):
    config.addinivalue_line("markers", MARKER)


def pytest_collection_modifyitems(config, items):
    if IN_VM_LANE:
        return
    skip = pytest.mark.skip(reason=SKIP_REASON)
    for item in items:
        if item.get_closest_marker("vm"):
            item.add_marker(skip)


def pytest_report_header(config):
    if IN_VM_LANE:
        nics = ", ".join(f"{name} ({drv})" for name, drv in sorted(_nics().items())) or "none"
        return f"vm lane: kernel {os.uname().release}, NICs: {nics}"
    return None


class VMHelpers:
    """The ``vm`` fixture."""

    @staticmethod
    def run(*argv, check=True, input=None, timeout=60) -> subprocess.CompletedProcess:
        """Run a command, output captured as text; a failure raises with its stderr."""
        proc = subprocess.run(argv, capture_output=True, text=True, input=input, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} failed ({proc.returncode}): "
                                 f"{proc.stdout.strip()} {proc.stderr.strip()}")
        return proc

    @classmethod
    def modprobe(cls, *modules: str) -> None:
        """Load kernel modules (no udev in the guest: nothing loads drivers for you)."""
        cls.run("modprobe", "-a", *modules)

    @classmethod
    def ip_batch(cls, commands: str, netns: str | None = None) -> None:
        """Many ``ip`` commands in one process (``ip -batch``), optionally inside a netns."""
        cls.run("ip", *(["-n", netns] if netns else []), "-batch", "-", input=commands)

    @staticmethod
    def unique(prefix: str = "vmt") -> str:
        return f"{prefix}{uuid.uuid4().hex[:6]}"


def _nics() -> dict[str, str]:
    """netdev name -> driver, for NICs backed by a (PCI) device in this netns."""
    found = {}
    for dev in Path("/sys/class/net").iterdir():
        driver = dev / "device" / "driver"
        if driver.exists():
            found[dev.name] = os.path.basename(os.readlink(driver))
    return found


def _nic_by_driver(driver: str) -> str | None:
    names = sorted(name for name, drv in _nics().items() if drv == driver)
    return names[0] if names else None


@pytest.fixture(scope="session")
def vm() -> VMHelpers:
    if not IN_VM_LANE:
        pytest.skip(SKIP_REASON)
    return VMHelpers()


@pytest.fixture
def vm_results(vm) -> Path:
    path = os.environ.get("NETPLUGIN_VM_RESULTS")
    if not path:
        pytest.skip("no shared results directory (scripts/test-vm sets NETPLUGIN_VM_RESULTS)")
    return Path(path)


@pytest.fixture
def igb_pf(vm) -> str:
    name = _nic_by_driver("igb")
    if name is None:
        pytest.skip("no igb NIC: the VM lane was started without --igb")
    return name


@pytest.fixture
def wire_peer(vm) -> str:
    name = _nic_by_driver("virtio_net")
    if name is None:
        pytest.skip("no virtio-net wire peer: the VM lane was started without --igb")
    return name


@pytest.fixture
def netns(vm):
    """``netns()`` creates a uniquely named network namespace (lo up) and returns its name; all
    are deleted after the test (physical netdevs and VFs inside go back to the root namespace)."""
    created: list[str] = []

    def make() -> str:
        name = vm.unique("vmns")
        vm.run("ip", "netns", "add", name)
        created.append(name)
        vm.ip_batch("link set lo up\n", netns=name)
        return name

    yield make
    for name in created:
        vm.run("ip", "netns", "delete", name, check=False)


@pytest.fixture
def wire(vm, igb_pf, wire_peer, netns):
    assert _num_vfs(igb_pf) == 0, "a previous test left VFs enabled"
    resources = Path(f"/sys/class/net/{igb_pf}/device/resource").read_text().splitlines()
    vf_bar = int(resources[7].split()[0], 16)  # PCI resource 7 = the PF's first SR-IOV BAR
    if vf_bar >= 1 << 32:
        pytest.fail(f"the igb PF's VF BARs are at {vf_bar:#x}, above 4 GiB: QEMU 10.0 decodes igbvf "
                    "BARs as 32-bit, so VFs never reach their registers (igbvf: 'PF still in reset "
                    "state', no carrier). Boot the lane with at most 2.75 GiB of RAM (vm-lane run --igb "
                    "--mem 2560M): the firmware then keeps the PCI windows below 4 GiB.")
    peer_ns = netns()
    vm.ip_batch(f"link set {wire_peer} netns {peer_ns}\n")
    vm.ip_batch(f"link set {wire_peer} up\naddr add {WIRE_PEER_IP}/24 dev {wire_peer}\n",
                netns=peer_ns)
    yield igb_pf, peer_ns, netns
    if _num_vfs(igb_pf):  # VFs still in sandboxes vanish with them
        Path(f"/sys/class/net/{igb_pf}/device/sriov_numvfs").write_text("0")
    # back now: a deleted namespace returns its physical NICs asynchronously, too late for the
    # next test
    vm.ip_batch(f"link set {wire_peer} netns 1\n", netns=peer_ns)
    vm.run("ip", "addr", "flush", "dev", wire_peer)


def _num_vfs(pf: str) -> int:
    return int(Path(f"/sys/class/net/{pf}/device/sriov_numvfs").read_text())


@pytest.fixture(scope="module")
def lvm_pool(vm, tmp_path_factory):
    from tests.lab.lvm import thin_pool  # imports volplugin: only where a test wants LVM

    vm.modprobe("dm_thin_pool")
    with thin_pool(tmp_path_factory.mktemp("lvm"), size=2**30) as made:
        yield made

"""The doctor plumbing (plugincore.doctor: results, printing, exit status, deadlines, socket and state
directory probes), how netplugin maps kernel probe results to OK/WARN/FAIL, and volplugin doctor's
LVM checks on this host (which has no device-mapper: a FAIL with the fix, never a crash). No system
changes: nothing here loads a module or touches an interface."""
import io
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from netplugin import config as netconfig
from netplugin import doctor as netdoctor
from plugincore import doctor as d
from volplugin import config as volconfig
from volplugin import doctor as voldoctor


def test_render_and_exit_status():
    checks = [d.ok("running as root"), d.warn("kernel: vlan", "no 802.1Q", "modprobe 8021q"),
              d.fail("socket /x.sock", "does not exist", "netplugin serve")]
    text = d.render(checks)
    assert text.splitlines() == [
        "OK    running as root",
        "WARN  kernel: vlan: no 802.1Q",
        "      fix: modprobe 8021q",
        "FAIL  socket /x.sock: does not exist",
        "      fix: netplugin serve",
        "1 ok, 1 warnings, 1 failed",
    ]
    assert d.exit_status(checks) == 1
    assert d.exit_status(checks[:2]) == 0  # warnings alone do not fail
    out = io.StringIO()
    assert d.report(checks, True, out) == 1
    parsed = json.loads(out.getvalue())
    assert parsed["failed"] is True
    assert parsed["checks"][2] == {"name": "socket /x.sock", "status": "FAIL", "detail": "does not exist",
                                   "fix": "netplugin serve"}


def test_run_groups_keeps_order_and_bounds_hangs_and_errors():
    def slow():
        time.sleep(5)
        return [d.ok("never")]

    def broken():
        raise RuntimeError("boom")

    start = time.monotonic()
    checks = d.run_groups([("fast", lambda: [d.ok("fast")]), ("hung", slow), ("broken", broken)], timeout=0.5)
    assert time.monotonic() - start < 2, "a hung probe must not hold the doctor"
    assert [(c.name, c.status) for c in checks] == [("fast", "OK"), ("hung", "FAIL"), ("broken", "FAIL")]
    assert "no answer within 0.5s" in checks[1].detail and "RuntimeError: boom" in checks[2].detail


def test_socket_checks_missing_file_stale(tmp_path):
    missing = d.socket_checks(str(tmp_path / "np.sock"), ["NetworkDriver"], "start it")
    assert missing[0].status == "WARN" and "outside /run/docker/plugins" in missing[0].detail
    assert 'socket = "/run/docker/plugins/np.sock"' in missing[0].fix
    assert (missing[1].status, missing[1].fix) == ("FAIL", "start it") and "does not exist" in missing[1].detail

    (tmp_path / "file.sock").write_text("")
    assert d.socket_checks(str(tmp_path / "file.sock"), [], "start it")[-1].detail == "exists but is not a socket"

    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(tmp_path / "stale.sock"))
    stale.close()  # the file stays, nobody listens: what a killed plugin leaves
    os.chmod(tmp_path / "stale.sock", 0o666)
    checks = d.socket_checks(str(tmp_path / "stale.sock"), ["NetworkDriver"], "start it")
    mode, answer = checks[1], checks[2]
    assert mode.status == "FAIL" and "mode 0666" in mode.detail and "chmod 600" in mode.fix
    assert answer.status == "FAIL" and "nobody listens" in answer.detail and "stale socket" in answer.fix


def test_state_dir_check(tmp_path):
    assert d.state_dir_check(str(tmp_path), "state_dir").detail == "writable"
    assert os.listdir(tmp_path) == [], "the probe file is removed"
    assert "creates it" in d.state_dir_check(str(tmp_path / "new" / "dir"), "state_dir").detail
    (tmp_path / "file").write_text("")
    check = d.state_dir_check(str(tmp_path / "file" / "dir"), "state_dir")
    assert check.status == "FAIL" and "state_dir" in check.fix


def test_docker_check_without_dockerd(tmp_path):
    check, client = d.docker_check(f"unix://{tmp_path}/docker.sock", "docker_host")
    assert client is None and check.status == "WARN" and "no such socket" in check.detail
    assert "docker_host" in check.fix


def _probe_says(monkeypatch, **results):
    found = dict.fromkeys(netdoctor.FEATURES)
    found.update(results)
    monkeypatch.setattr(netdoctor, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0, json.dumps(found), ""))


def test_kernel_features_warn_until_a_network_needs_them(monkeypatch, tmp_path):
    usage = netdoctor.Usage(netconfig.load(overrides={"state_dir": str(tmp_path)}, environ={}))
    assert usage.modes == set() and not usage.shaping  # no state database yet: nothing in use
    _probe_says(monkeypatch, vlan="NetlinkError: (95, 'Operation not supported')")
    checks = {c.name: c for c in netdoctor.kernel_checks(usage)}
    assert checks["kernel: bridge"].status == "OK"
    vlan = checks["kernel: vlan"]
    assert vlan.status == "WARN" and "Operation not supported" in vlan.detail and "mode=vlan" in vlan.detail
    assert ("8021q" in vlan.fix) if os.path.exists("/proc/modules") else ("CONFIG_VLAN_8021Q" in vlan.fix)
    usage.modes.add("vlan")
    assert {c.name: c for c in netdoctor.kernel_checks(usage)}["kernel: vlan"].status == "FAIL"
    _probe_says(monkeypatch, bridge="NetlinkError: (95, 'Operation not supported')")
    assert {c.name: c for c in netdoctor.kernel_checks(usage)}["kernel: bridge"].status == "FAIL"


def test_usage_reads_modes_and_rates_from_the_state(tmp_path):
    from netplugin.service import Services
    from netplugin.state import READY, Network

    config = netconfig.load(overrides={"state_dir": str(tmp_path)}, environ={})
    state = Services(config).driver.state
    state.claim_network(Network(id="n" * 64, mode="overlay", options={"egress": 10_000_000}, status=READY))
    usage = netdoctor.Usage(config)
    assert usage.modes == {"overlay"} and usage.shaping and usage.network_ids == {"n" * 64}


@pytest.mark.skipif(os.geteuid() != 0, reason="lvm needs root")
def test_volplugin_doctor_lvm_without_device_mapper(tmp_path):
    config = volconfig.load(overrides={"state_dir": str(tmp_path / "state"), "backends": ["lvm"],
                                       "volume": {"backend": "lvm"}}, environ={})
    checks = voldoctor.lvm_checks(config)
    with open("/proc/misc") as f:
        has_dm = "device-mapper" in f.read()
    dm = next(c for c in checks if c.name == "lvm: device-mapper")
    if has_dm:  # the VM lane: the volume group is what is missing
        assert dm.status == "OK" and checks[-1].status == "FAIL" and "lvm-setup" in checks[-1].fix
    else:
        assert dm.status == "FAIL" and ("dm_mod" in dm.fix or "CONFIG_BLK_DEV_DM" in dm.fix)
    assert not (tmp_path / "state").exists(), "the doctor creates nothing"


def test_volplugin_doctor_cli_exit_status(tmp_path):
    """As a process: no plugin on the socket is a FAIL (exit 1), the JSON form parses."""
    (tmp_path / "vp.toml").write_text('backends = ["lvm"]\n[volume]\nbackend = "lvm"\n')
    proc = subprocess.run([sys.executable, "-m", "volplugin", "doctor", "--json", "--config", str(tmp_path / "vp.toml"),
                           "--state-dir", str(tmp_path / "state"), "--socket", str(tmp_path / "vp.sock"),
                           "--docker-host", f"unix://{tmp_path}/docker.sock"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1, proc.stderr
    checks = {c["name"]: c for c in json.loads(proc.stdout)["checks"]}
    assert checks[f"socket {tmp_path}/vp.sock"]["status"] == "FAIL"
    assert "volplugin serve" in checks[f"socket {tmp_path}/vp.sock"]["fix"]
    assert checks["tool blkid"]["status"] == "OK"

"""`volplugin doctor` and `volplugin status` as processes against the test Ceph: a reachable cluster and
its pool, a missing pool, a dead cluster (FAIL within the doctor's cap, not connect_timeout), the
attach methods of this host, a live served plugin, and a mounted volume's row and drift."""
import json
import os
import socket
import subprocess
import sys
import time
import uuid

import pytest

from tests.lab import REPO_ROOT, sh
from tests.lab.plugin import Plugin

pytestmark = pytest.mark.kernel


def _write(path, ceph_conf, pool, **top):
    lines = [f'{k} = "{v}"' for k, v in {"host_id": "hostA", **top}.items()]
    lines += ["[rbd]", f'conf = "{ceph_conf}"', f'pool = "{pool}"', "connect_timeout = 10.0", "op_timeout = 15.0"]
    path.write_text("\n".join(lines) + "\n")
    return path


def cli(*args, config, state_dir):
    return subprocess.run([sys.executable, "-m", "volplugin", *args, "--config", str(config), "--state-dir",
                           str(state_dir)], capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)


def doctor(config, state_dir, tmp_path) -> tuple[int, dict]:
    proc = cli("doctor", "--json", "--docker-host", f"unix://{tmp_path}/no-docker.sock", config=config,
               state_dir=state_dir)
    return proc.returncode, {c["name"]: c for c in json.loads(proc.stdout)["checks"]}


def test_doctor_reaches_the_cluster_and_reports_attach_methods(ceph, tmp_path):
    config = _write(tmp_path / "vp.toml", ceph.conf_path, ceph.pool, socket=tmp_path / "vp.sock")
    start = time.monotonic()
    status, checks = doctor(config, tmp_path / "state", tmp_path)
    assert time.monotonic() - start < 10
    assert status == 1  # no plugin on the socket
    assert checks[f"socket {tmp_path}/vp.sock"]["status"] == "FAIL"
    assert checks["rbd: Ceph cluster"]["status"] == "OK"
    assert checks[f"rbd: pool {ceph.pool}"]["status"] == "OK"
    assert checks["rbd: cluster health"]["status"] in ("OK", "WARN")
    assert checks["rbd: attach via fuse"]["status"] == "OK"
    krbd = checks["rbd: attach via krbd"]
    if not os.path.isdir("/sys/bus/rbd"):  # this host: no krbd, the fallback works
        assert krbd["status"] == "WARN" and "falls back to fuse" in krbd["detail"]
        assert "modprobe rbd" in krbd["fix"] or "CONFIG_BLK_DEV_RBD" in krbd["fix"]
    assert not (tmp_path / "state").exists(), "the doctor creates nothing"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_doctor_missing_pool_and_dead_cluster(ceph, tmp_path):
    pool = "nosuch" + uuid.uuid4().hex[:6]
    status, checks = doctor(_write(tmp_path / "nopool.toml", ceph.conf_path, pool), tmp_path / "s1", tmp_path)
    assert status == 1 and checks[f"rbd: pool {pool}"]["status"] == "FAIL"
    assert checks[f"rbd: pool {pool}"]["fix"].startswith(f"ceph osd pool create {pool}")

    dead = tmp_path / "dead.conf"  # a monitor address nobody listens on
    dead.write_text(f"[global]\nmon_host = 127.0.0.1:{_free_port()}\nauth_client_required = none\n")
    start = time.monotonic()
    status, checks = doctor(_write(tmp_path / "dead.toml", dead, "rbd"), tmp_path / "s2", tmp_path)
    took = time.monotonic() - start
    assert status == 1 and checks["rbd: Ceph cluster"]["status"] == "FAIL", checks
    assert "ceph -s" in checks["rbd: Ceph cluster"]["fix"]
    assert took < 12, f"the doctor took {took:.1f}s: connect_timeout (10 s) must be capped"


def test_served_plugin_doctor_and_status_of_a_mounted_volume(ceph, tmp_path):
    config = _write(tmp_path / "vp.toml", ceph.conf_path, ceph.pool)
    plugin = Plugin(None, tmp_path / "plugin", name=f"vptest{os.urandom(3).hex()}",
                    command=[sys.executable, "-m", "volplugin"], extra_args=("--config", str(config)))
    name = "d" + uuid.uuid4().hex[:10]
    created = False
    try:
        plugin.start(timeout=60)
        config.write_text(config.read_text().replace("[rbd]", f'socket = "{plugin.socket}"\n[rbd]'))
        status, checks = doctor(config, plugin.state_dir, tmp_path)
        assert checks[f"socket {plugin.socket}"]["status"] == "OK"
        assert checks["plugin answers"]["detail"] == "/Plugin.Activate: VolumeDriver"
        assert status == (1 if any(c["status"] == "FAIL" for c in checks.values()) else 0)

        assert plugin.call("/VolumeDriver.Create", {"Name": name, "Opts": {"size": "256M", "fs": "ext4"}},
                           timeout=120).get("Err") in (None, "")
        created = True
        mountpoint = plugin.call("/VolumeDriver.Mount", {"Name": name, "ID": "c1"}, timeout=120)["Mountpoint"]
        proc = cli("status", "--json", config=config, state_dir=plugin.state_dir)
        assert proc.returncode == 0, proc.stderr
        report = json.loads(proc.stdout)
        row = next(r for r in report["volumes"] if r["name"] == name)
        assert (row["backend"], row["size"], row["fs"], row["pool"]) == ("rbd", 256 * 2**20, "ext4", ceph.pool)
        assert (row["holder"], row["containers"], row["mountpoint"]) == ("hostA", ["c1"], mountpoint)
        assert row["used"] > 0 and row["drift"] == [] and report["drift"] == []
        text = cli("status", config=config, state_dir=plugin.state_dir).stdout
        cols = next(x for x in text.splitlines() if x.startswith(name + " ")).split()
        assert cols[:4] == [name, "rbd", "256.0", "MiB"] and "c1" in cols and cols[-1] == mountpoint, cols
        assert "as the state says" in text

        sh(["umount", "-l", mountpoint])  # behind the plugin's back
        report = json.loads(cli("status", "--json", config=config, state_dir=plugin.state_dir).stdout)
        row = next(r for r in report["volumes"] if r["name"] == name)
        assert row["drift"] == [f"recorded mount {mountpoint} missing in kernel (not in /proc/self/mountinfo)"]
    finally:
        if created:
            plugin.call("/VolumeDriver.Unmount", {"Name": name, "ID": "c1"}, timeout=120)
            assert plugin.call("/VolumeDriver.Remove", {"Name": name}, timeout=120).get("Err") in (None, "")
        plugin.destroy()

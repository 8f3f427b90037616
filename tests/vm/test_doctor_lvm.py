"""`volplugin doctor` with the LVM backend where device-mapper exists (the VM lane): OK for the tool,
device-mapper, thin provisioning and the thin pool; WARN and FAIL as the pool fills past
warn_pool_percent and max_pool_percent; FAIL with `volplugin lvm-setup` for a missing volume group."""
import json
import subprocess
import sys

import pytest

from tests.lab.lvm import thin_pool

pytestmark = pytest.mark.vm
MiB = 2**20


def doctor(config, tmp_path) -> dict:
    proc = subprocess.run([sys.executable, "-m", "volplugin", "doctor", "--json", "--config", str(config),
                           "--socket", str(tmp_path / "none.sock"), "--docker-host", f"unix://{tmp_path}/none"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr  # the socket: no plugin runs
    return {c["name"]: c for c in json.loads(proc.stdout)["checks"]}


def test_lvm_doctor_ok_warn_fail(vm, tmp_path):
    vm.modprobe("dm_thin_pool")
    with thin_pool(tmp_path, size=256 * MiB) as pool:
        name = f"lvm: thin pool {pool.vg}/{pool.pool}"
        checks = doctor(pool.write_config(tmp_path / "vp.toml", tmp_path / "state"), tmp_path)
        for check in ("tool lvm", "lvm: device-mapper", "lvm: thin provisioning", name):
            assert checks[check]["status"] == "OK", checks[check]
        assert checks[name]["detail"].startswith("data 0%")

        pool.lvm("lvcreate", "-T", f"{pool.vg}/{pool.pool}", "-V", "160m", "-n", "filler", "-y")
        device = pool.lvm.report("lvs", f"{pool.vg}/filler", fields="lv_dm_path")[0]["lv_dm_path"]
        pool.fill(device, 96)  # about 40% of the pool's data
        warn = doctor(pool.write_config(tmp_path / "warn.toml", tmp_path / "state", warn_pool_percent=20.0),
                      tmp_path)[name]
        assert warn["status"] == "WARN" and "warn_pool_percent" in warn["detail"] and "lvextend" in warn["fix"]
        full = doctor(pool.write_config(tmp_path / "full.toml", tmp_path / "state", warn_pool_percent=10.0,
                                        max_pool_percent=30.0), tmp_path)[name]
        assert full["status"] == "FAIL" and "refused" in full["detail"]
        pool.lvm("lvremove", "-y", f"{pool.vg}/filler")

        missing = pool.write_config(tmp_path / "missing.toml", tmp_path / "state")
        missing.write_text(missing.read_text().replace(f'vg = "{pool.vg}"', 'vg = "nosuchvg"'))
        checks = doctor(missing, tmp_path)
        assert checks["lvm: thin pool nosuchvg/tp"]["status"] == "FAIL"
        assert "volplugin lvm-setup" in checks["lvm: thin pool nosuchvg/tp"]["fix"]

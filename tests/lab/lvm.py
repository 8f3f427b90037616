"""Throwaway LVM thin pools for tests (device-mapper exists only in the VM lane): a sparse file behind
a loop device, a uniquely named volume group on it and a thin pool, made by the product's own
``volplugin lvm-setup`` code and removed with everything in it afterwards (also when the test failed:
mounts on its LVs are unmounted first).
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

from volplugin.backends import lvm_setup
from volplugin.backends.lvm import LvmBackend
from volplugin.backends.lvm_command import Lvm


@dataclass
class ThinPool:
    vg: str
    pool: str
    loop_file: str
    lvm: Lvm

    def backend(self, state_dir, host_id: str = "hostA", **options) -> LvmBackend:
        return LvmBackend(vg=self.vg, thin_pool=self.pool, host_id=host_id, state_dir=str(state_dir),
                          monitoring=False, **options)

    def config(self, state_dir, **lvm_options) -> dict:
        """volplugin configuration overrides serving this pool with the LVM backend only."""
        return {"state_dir": str(state_dir), "host_id": "hostA", "backends": ["lvm"],
                "volume": {"backend": "lvm", "size": "256M", "fs": "ext4", "uid": "999", "gid": "999",
                           "pgdata": "pgdata"},
                "lvm": {"vg": self.vg, "thin_pool": self.pool, "loop_file": "", "timeout": 60.0,
                        "monitoring": False, "max_overcommit": 4.0, "max_pool_percent": 90.0,
                        "warn_pool_percent": 80.0, **lvm_options}}

    def write_config(self, path, state_dir, **lvm_options) -> Path:
        """config() as a TOML file, for a served plugin (``--config``)."""
        Path(path).write_text(toml_text(self.config(state_dir, **lvm_options)))
        return Path(path)

    def lvs(self) -> dict[str, dict]:
        rows = self.lvm.report("lvs", self.vg, fields="lv_name,lv_tags,lv_active,lv_skip_activation,origin,"
                               "lv_size,data_percent,lv_device_open")
        return {r["lv_name"]: r for r in rows}

    def fill(self, device: str, mib: int) -> None:
        """Write ``mib`` MiB of data straight to a device (makes the pool allocate blocks)."""
        subprocess.run(["dd", "if=/dev/urandom", f"of={device}", "bs=1M", f"count={mib}", "oflag=direct",
                        "status=none"], check=True, timeout=300)


def toml_text(config: dict) -> str:
    """The few TOML shapes volplugin's configuration needs: scalars, lists of scalars, one level of tables."""
    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)  # a JSON string is a valid TOML basic string
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        raise TypeError(f"no TOML for {v!r}")

    lines = [f"{k} = {value(v)}" for k, v in config.items() if not isinstance(v, dict)]
    for table, body in config.items():
        if isinstance(body, dict):
            lines += ["", f"[{table}]", *(f"{k} = {value(v)}" for k, v in body.items())]
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def thin_pool(workdir, size: int = 2 * 2**30, pool_percent: int = 90):
    lvm = Lvm(monitoring=False)
    name = f"vpt{uuid.uuid4().hex[:6]}"
    pool = ThinPool(vg=name, pool="tp", loop_file=str(Path(workdir) / f"{name}.img"), lvm=lvm)
    lvm_setup.setup(lvm, pool.vg, pool.pool, loop_file=pool.loop_file, size=size, pool_percent=pool_percent)
    try:
        yield pool
    finally:
        _unmount_everything_on(pool.vg)
        lvm_setup.teardown(lvm, pool.vg, loop_file=pool.loop_file, remove_file=True)


def _unmount_everything_on(vg: str) -> None:
    prefix = f"/dev/mapper/{vg.replace('-', '--')}-"
    with open("/proc/self/mountinfo") as f:
        targets = [line.split()[4] for line in f if line.split(" - ")[1].split()[1].startswith(prefix)]
    for target in reversed(targets):
        subprocess.run(["umount", "-l", target], check=False, timeout=60)
    with contextlib.suppress(OSError):
        os.sync()

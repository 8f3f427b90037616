"""`volplugin lvm-setup` / `lvm-teardown`: the volume group and thin pool the LVM backend uses, on given
block devices or, for trials, on a sparse file behind a loop device. Idempotent: what exists is kept.

A loop device does not survive a reboot; with ``[lvm] loop_file`` configured, ``volplugin serve``
re-attaches the file at start-up (ensure_loop) so the volume group comes back.
"""
from __future__ import annotations

import contextlib
import logging
import os

from plugincore.errors import Conflict, InvalidRequest
from plugincore.run import run

from .lvm import TAG, check_vg_name
from .lvm_command import Lvm, LvmNotFound

log = logging.getLogger("volplugin.lvm")


def loop_devices_of(path: str) -> list[str]:
    """Loop devices backed by ``path`` (losetup -j)."""
    out = run(["losetup", "--noheadings", "--output", "NAME", "--associated", path], timeout=30).stdout
    return [line.strip() for line in out.splitlines() if line.strip()]


def ensure_loop(path: str, size: int | None = None) -> str:
    """The loop device backed by ``path``, attaching it (and creating the sparse file of ``size``
    bytes when missing) if needed."""
    if not os.path.exists(path):
        if not size:
            raise InvalidRequest(f"{path} does not exist: give a size to create it")
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "xb") as f:
            f.truncate(size)  # sparse: blocks are used only as the pool fills
    found = loop_devices_of(path)
    if found:
        return found[0]
    return run(["losetup", "--find", "--show", path], timeout=30).stdout.strip()


def _exists(lvm: Lvm, command: str, target: str, fields: str) -> list[dict]:
    try:
        return lvm.report(command, target, fields=fields, what=f"looking up {target}")
    except LvmNotFound:
        return []


def setup(lvm: Lvm, vg: str, pool: str, *, devices: list[str] = (), loop_file: str = "",
          size: int | None = None, pool_percent: int = 90) -> dict:
    """Create what is missing of: the loop device, PVs + VG on ``devices``, the thin pool using
    ``pool_percent`` of the VG's free space (the rest leaves LVM room to grow the pool's metadata).
    A failure undoes what this call created."""
    check_vg_name(vg, "volume group")
    check_vg_name(pool, "thin pool")
    if not 10 <= pool_percent <= 100:
        raise InvalidRequest("pool_percent must be within 10..100")
    devices = list(devices)
    with contextlib.ExitStack() as undo:
        if loop_file:
            fresh_file = not os.path.exists(loop_file)
            had_loop = not fresh_file and bool(loop_devices_of(loop_file))
            device = ensure_loop(loop_file, size)
            if not had_loop:
                undo.callback(run, ["losetup", "--detach", device], timeout=30, check=False)
            if fresh_file:
                undo.callback(os.unlink, loop_file)
            devices.append(device)
        created = {"vg": False, "pool": False}
        if not _exists(lvm, "vgs", vg, "vg_name"):
            if not devices:
                raise InvalidRequest(f"volume group {vg} does not exist: give devices or a loop file")
            lvm("pvcreate", "-y", *devices, what=f"initialising {', '.join(devices)}")
            undo.callback(lvm, "pvremove", "-y", *devices)
            lvm("vgcreate", vg, *devices, what=f"creating volume group {vg}")
            undo.callback(lvm, "vgremove", "-y", vg)
            created["vg"] = True
        rows = _exists(lvm, "lvs", f"{vg}/{pool}", "lv_name,segtype")
        if rows and rows[0]["segtype"] != "thin-pool":
            raise Conflict(f"{vg}/{pool} exists and is not a thin pool")
        if not rows:
            lvm("lvcreate", "-y", "-T", f"{vg}/{pool}", "-l", f"{pool_percent}%FREE", "--addtag", TAG,
                what=f"creating thin pool {vg}/{pool}")
            created["pool"] = True
        undo.pop_all()
    log.info("volume group %s with thin pool %s ready (%s)", vg, pool, created)
    return created


def teardown(lvm: Lvm, vg: str, *, loop_file: str = "", remove_file: bool = False) -> None:
    """Remove the volume group (refused while any of its LVs is open), its PVs' labels, the loop
    device and, with ``remove_file``, the file."""
    check_vg_name(vg, "volume group")
    if _exists(lvm, "vgs", vg, "vg_name"):
        rows = lvm.report("lvs", vg, fields="lv_name,lv_device_open,segtype", what=f"listing {vg}")
        # a thin pool counts as open while any of its thin LVs is active: that LV is the user
        busy = [r["lv_name"] for r in rows if r["lv_device_open"] == "open" and r["segtype"] != "thin-pool"]
        if busy:
            raise Conflict(f"volume group {vg} has LVs in use: {', '.join(busy)}")
        pvs = [r["pv_name"] for r in lvm.report("pvs", "--select", f"vg_name={vg}", fields="pv_name",
                                                what=f"listing the PVs of {vg}")]
        lvm("vgremove", "-y", "-ff", vg, what=f"removing volume group {vg}")
        if pvs:
            lvm("pvremove", "-y", *pvs, what=f"wiping {', '.join(pvs)}")
    if loop_file and os.path.exists(loop_file):
        for device in loop_devices_of(loop_file):
            run(["losetup", "--detach", device], timeout=30)
        if remove_file:
            os.unlink(loop_file)

"""Which block devices LVM must never scan: the ones whose reads wait on Ceph.

LVM reads a label from every block device it finds (volplugin runs it with
``obtain_device_list_from_udev = 0``, so: everything in /dev). An RBD image mapped by krbd or nbd, and a
loop device over an rbd-fuse file (the RBD backend's own attachments), answer reads only while the Ceph
cluster does; rbd-fuse even waits for it without a timeout so that no write is lost. Without a filter,
one unreachable OSD made every lvm command - and so every request on a purely local LVM volume - hang
until its timeout, and a plugin starting up then stayed in its start-up reconciliation for minutes.
None of these devices can hold a PV volplugin uses, so rejecting them costs nothing.
"""
from __future__ import annotations

import os
import re

from plugincore.run import CommandError, run

# lvm.conf regex filters, first match wins; a device is rejected when any of its names matches a reject
# pattern before an accept one, so the loop devices are rejected under both names LVM knows them by.
_CEPH_BLOCK_DEVICES = ("r|^/dev/rbd[0-9]|", "r|^/dev/nbd[0-9]|")
_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"')


def loops_over_rbd_fuse(sys_block: str = "/sys/block",
                        mountinfo: str = "/proc/self/mountinfo") -> list[tuple[str, str]]:
    """(device name, "major:minor") of every loop device whose backing file lies on an rbd-fuse mount."""
    roots = rbd_fuse_mounts(mountinfo)
    if not roots:
        return []
    found = []
    for name in _listdir(sys_block):
        if not name.startswith("loop"):
            continue
        backing = _read(os.path.join(sys_block, name, "loop", "backing_file"))
        if backing and any(backing.startswith(root + "/") for root in roots):
            found.append((name, _read(os.path.join(sys_block, name, "dev"))))
    return found


def rbd_fuse_mounts(mountinfo: str = "/proc/self/mountinfo") -> list[str]:
    try:
        with open(mountinfo) as f:
            lines = f.readlines()
    except OSError:
        return []
    roots = []
    for line in lines:
        before, _, after = line.partition(" - ")
        fields = before.split()
        if after.split(" ", 1)[0] == "fuse.rbd-fuse" and len(fields) > 4:
            roots.append(_unescape(fields[4]))
    return roots


def reject_patterns(sys_block: str = "/sys/block", mountinfo: str = "/proc/self/mountinfo") -> list[str]:
    """The reject patterns for right now (loop devices come and go with attachments)."""
    patterns = list(_CEPH_BLOCK_DEVICES)
    for name, major_minor in loops_over_rbd_fuse(sys_block, mountinfo):
        patterns.append(f"r|^/dev/{re.escape(name)}$|")
        if major_minor:
            patterns.append(f"r|^/dev/block/{re.escape(major_minor)}$|")
    return patterns


def configured_global_filter(timeout: float) -> list[str] | None:
    """The host's own devices/global_filter from lvm.conf ([] when unset, None when lvm did not answer):
    ``--config`` replaces a setting, so the administrator's patterns are kept after ours."""
    try:
        out = run(["lvm", "lvmconfig", "devices/global_filter"], timeout=timeout, check=False,
                  env={"LVM_SUPPRESS_FD_WARNINGS": "1"})
    except CommandError:
        return None  # no lvm at all, or a hung one: the command itself then fails with LVM's error
    if out.returncode != 0:
        return []  # not set: LVM's default accepts every device
    return _QUOTED.findall(out.stdout)


def filter_setting(patterns: list[str]) -> str:
    # ours hold neither quotes nor backslashes; the administrator's come as lvmconfig printed them
    return "global_filter = [ " + ", ".join(f'"{p}"' for p in patterns) + " ]"


def _unescape(path: str) -> str:
    # mountinfo writes space, tab, newline and backslash as \040, \011, \012, \134
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), path)


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""

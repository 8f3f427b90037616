"""Leak audit of a served volplugin on RBD: its state (SQLite, read only) against this host (mounts, loop
devices, rbd-fuse processes under its state directory) and Ceph (images, the ``volplugin.owner``
ownership record, watchers, librbd lock owners), and both against what the caller ("Docker") holds.
Every finding is one line; an empty list means all agree.

Reads the host and Ceph itself (rados/rbd bindings, /proc, /sys): a bug shared by the plugin's code and
its own reconciliation cannot hide here. Run it with the cluster's OSD up and no request in flight.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import rados
import rbd

from .audit import read_rows

OWNER_KEY = "volplugin.owner"


def _mounts_under(root: str) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        targets = [line.split()[4].encode().decode("unicode_escape") for line in f]
    return [t for t in targets if t.startswith(root + "/")]


def _loops_under(root: str) -> dict[str, str]:
    """Loop device -> backing file, for backing files under ``root``."""
    found = {}
    for name in os.listdir("/sys/block"):
        with contextlib.suppress(OSError):
            with open(f"/sys/block/{name}/loop/backing_file") as f:
                backing = f.read().strip()
            if backing.startswith(root + "/"):
                found["/dev/" + name] = backing
    return found


def krbd_mappings() -> dict[str, tuple[str, str]]:
    """/dev/rbdN -> (pool, image) of every krbd mapping in this kernel, read from sysfs directly (not
    through the code under test)."""
    devices = Path("/sys/bus/rbd/devices")
    if not devices.is_dir():
        return {}
    return {f"/dev/rbd{d.name}": ((d / "pool").read_text().strip(), (d / "name").read_text().strip())
            for d in devices.iterdir()}


def _fuse_images(root: str) -> list[str]:
    """Image names of the rbd-fuse processes serving a directory under ``root``."""
    images = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")
            if argv and argv[0].endswith("rbd-fuse") and any(a.startswith(root + "/") for a in argv) \
                    and "-r" in argv:
                images.append(argv[argv.index("-r") + 1])
    return images


def ceph_images(ceph, prefix: str) -> dict[str, dict]:
    """Image name -> {owner: record or None, watchers: n, lock_owners: n} for images named prefix*."""
    facts = {}
    cluster = rados.Rados(conffile=ceph.conf_path)
    cluster.connect(timeout=30)
    try:
        with cluster.open_ioctx(ceph.pool) as ioctx:
            for name in rbd.RBD().list(ioctx):
                if not name.startswith(prefix):
                    continue
                try:
                    image = rbd.Image(ioctx, name, read_only=True)
                except rbd.ImageNotFound:  # listed, no header: the remains of a create cut off
                    facts[name] = {"owner": None, "watchers": 0, "lock_owners": 0, "half-created": True}
                    continue
                with image:
                    try:
                        owner = image.metadata_get(OWNER_KEY)
                    except KeyError:
                        owner = None
                    lockers = image.list_lockers()  # librbd's exclusive lock shows here too
                    facts[name] = {"owner": owner, "watchers": len(list(image.watchers_list())),
                                   "lock_owners": len(lockers["lockers"]) if lockers else 0}
    finally:
        cluster.shutdown()
    return facts


def audit_volplugin(plugin, ceph, *, prefix: str, held: dict[str, set], maybe_held: dict[str, set],
                    maybe_present: set[str], watches_may_linger: bool = False, attach: str = "fuse") -> list[str]:
    """``held``: volume -> the mount IDs Docker holds (every volume Docker has); ``maybe_held``: IDs whose
    Mount or Unmount reply was lost (the plugin may keep them or not); ``maybe_present``: names whose
    Create or Remove reply was lost (the plugin may have them or not); ``watches_may_linger``: a client
    died within osd_client_watch_timeout (every OSD start re-arms that timer), so its watch may still
    be there; ``attach``: how the plugin attaches here, "fuse" (rbd-fuse + loop) or "krbd". Only volumes
    named ``prefix``* are looked at."""
    root = str(plugin.state_dir)
    db = plugin.state_dir / "volplugin.db"
    volumes = {r["name"]: r["status"] for r in read_rows(db, "SELECT name, status FROM volumes")
               if r["name"].startswith(prefix)}
    attached = {r["volume"]: r["mountpoint"] for r in read_rows(db, "SELECT volume, mountpoint FROM attachments")
                if r["volume"].startswith(prefix)}
    callers: dict[str, set] = {}
    for r in read_rows(db, "SELECT volume, caller FROM mount_ids"):
        if r["volume"].startswith(prefix):
            callers.setdefault(r["volume"], set()).add(r["caller"])
    found = []

    # state against Docker
    for name, ids in held.items():
        if volumes.get(name) != "ready" and name not in maybe_present:  # a lost Remove reply: maybe gone
            found.append(f"Docker's volume {name} is {volumes.get(name) or 'unknown to the plugin'}")
        have, excused = callers.get(name, set()), maybe_held.get(name, set())
        if ids - have:
            found.append(f"volume {name}: Docker's mount IDs {sorted(i[:8] for i in ids - have)} unknown to the plugin")
        if have - ids - excused:
            found.append(f"volume {name}: mount IDs {sorted(i[:8] for i in have - ids - excused)} Docker never holds")
        if ids and name not in attached:
            found.append(f"volume {name} is mounted by Docker's containers but not attached")
    for name in set(volumes) - set(held) - maybe_present:
        found.append(f"volume {name} ({volumes[name]}) the plugin keeps but Docker does not have")
    for name in set(callers) - set(held):
        found.append(f"volume {name} Docker does not have still has mount IDs")
    for name in attached:
        if not callers.get(name):
            found.append(f"volume {name} is attached with no mount ID")

    # state against this host
    found += (_host_fuse if attach == "fuse" else _host_krbd)(root, ceph, prefix, attached)

    # state against Ceph
    images = ceph_images(ceph, prefix)
    for name in set(held) - set(images) - maybe_present:
        found.append(f"Docker's volume {name} has no RBD image")
    for name in set(images) - set(held) - maybe_present:
        found.append(f"RBD image {name} of no volume Docker has")
    for name, facts in images.items():
        if name in attached:
            if facts["owner"] is None:
                found.append(f"attached volume {name} has no ownership record")
            continue
        if facts["owner"] is not None:
            found.append(f"volume {name} not attached here keeps the ownership record {facts['owner']}")
        if (facts["watchers"] and not watches_may_linger) or facts["lock_owners"]:
            found.append(f"volume {name} not attached here has {facts['watchers']} watcher(s) and "
                         f"{facts['lock_owners']} lock owner(s)")
    return found


def _host_fuse(root: str, ceph, prefix: str, attached: dict[str, str]) -> list[str]:
    """Mounts, loop devices and rbd-fuse processes under the plugin's state directory."""
    found = []
    mounts = _mounts_under(root)
    fuse_mounts = [m for m in mounts if m.startswith(os.path.join(root, "rbd") + "/")]
    volume_mounts = sorted(set(mounts) - set(fuse_mounts))
    if volume_mounts != sorted(attached.values()):
        found.append(f"mounts {volume_mounts} differ from the attachments' {sorted(attached.values())}")
    if len(fuse_mounts) != len(attached):
        found.append(f"{len(fuse_mounts)} rbd-fuse mounts for {len(attached)} attachments: {fuse_mounts}")
    loops = _loops_under(root)
    loop_images = sorted(os.path.basename(b) for b in loops.values())
    if loop_images != sorted(attached):
        found.append(f"loop devices {sorted(loops.items())} for the attachments {sorted(attached)}")
    fuse_images = sorted(i for i in _fuse_images(root) if i.startswith(prefix))
    if fuse_images != sorted(attached):
        found.append(f"rbd-fuse processes for {fuse_images}, attachments {sorted(attached)}")
    return found


def _host_krbd(root: str, ceph, prefix: str, attached: dict[str, str]) -> list[str]:
    """Mounts under the plugin's state directory and the kernel's mappings of the test's images."""
    found = []
    volume_mounts = sorted(_mounts_under(root))
    if volume_mounts != sorted(attached.values()):
        found.append(f"mounts {volume_mounts} differ from the attachments' {sorted(attached.values())}")
    mapped = sorted(image for pool, image in krbd_mappings().values() if pool == ceph.pool and image.startswith(prefix))
    if mapped != sorted(attached):
        found.append(f"krbd mappings of {mapped}, attachments {sorted(attached)}")
    if _loops_under(root) or _fuse_images(root):
        found.append(f"loop devices {_loops_under(root)} / rbd-fuse for {_fuse_images(root)} with krbd")
    return found

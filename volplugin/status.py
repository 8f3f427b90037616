"""`volplugin status`: every volume with its backend, size, use, holder, this host's containers (Docker
caller IDs), snapshots and mount, the LVM thin pools' fill, and drift between this host's state and the
kernel's mount table (/proc/self/mountinfo), device nodes and the backend's view of holders.

A Ceph cluster that does not answer is probed once (connect_timeout), not once per volume: its volumes
are then listed from this host's state alone, with the error. Read-only: nothing is repaired here
(start-up reconciliation does that).
"""
from __future__ import annotations

import os
import sys

from plugincore.errors import NotFound, PluginError
from plugincore.table import table
from . import filesystem
from .state import READY


def human(size) -> str:
    if not isinstance(size, (int, float)):
        return ""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return ""


def mount_table() -> dict[str, str]:
    """{mount point: source} per /proc/self/mountinfo (the kernel's truth)."""
    found = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            found[filesystem.unescape(fields[4])] = fields[sep + 2]
    return found


def unreachable_backends(driver) -> dict[str, str]:
    """{backend name: error} of backends whose cluster does not answer (one bounded connect each)."""
    down = {}
    for name, backend in driver.backends.items():
        cluster = getattr(backend, "cluster", None)
        if cluster is None:
            continue
        try:
            cluster.client()
        except PluginError as exc:
            down[name] = str(exc)
    return down


def _live_row(driver, name: str) -> dict:
    """Facts from the backend (Get, holder, snapshots): the cluster answers."""
    got = driver.get(name)
    status = got["Status"]
    volume = driver.state.volume(name) or driver._find(name)
    backend, spec = driver._backend(volume["options"]), driver._spec(name, volume)
    holder = backend.holder(spec)
    snapshots = backend.snapshot_list(spec)
    pool = (f"{status['vg']}/{status['thin_pool']}" if status.get("vg") else
            status.get("pool") or getattr(backend, "pool", ""))
    return {"backend": status["backend"], "size": status["size"], "fs": status["fs"], "pool": pool,
            "used": status.get("used"), "allocated_percent": status.get("allocated_percent"),
            "holder": holder.host if holder else "", "holder_alive": getattr(holder, "alive", None),
            "snapshots": [s["name"] for s in snapshots], "pg_version": status.get("pg_version", ""),
            "created_at": got["CreatedAt"], "status": status}


def _local_row(driver, name: str, error: str) -> dict:
    volume = driver.state.volume(name) or {"options": {}, "backend_data": {}, "created_at": ""}
    options = volume["options"]
    return {"backend": options.get("backend", ""), "size": options.get("size"), "fs": options.get("fs", ""),
            "pool": volume["backend_data"].get("pool", ""), "used": None, "allocated_percent": None,
            "holder": "", "holder_alive": None, "snapshots": [], "pg_version": "",
            "created_at": volume["created_at"], "status": {}, "error": error}


def volume_row(driver, name: str, down: dict, mounts: dict) -> dict:
    local = driver.state.volume(name)
    backend = (local or {}).get("options", {}).get("backend")
    if backend in down:
        row = _local_row(driver, name, f"backend {backend} unreachable: {down[backend]}")
    else:
        try:
            row = _live_row(driver, name)
        except NotFound as exc:
            row = _local_row(driver, name, str(exc))
        except PluginError as exc:
            row = _local_row(driver, name, str(exc))
    attached = driver.state.attachment(name)
    callers = driver.state.callers(name)
    mountpoint = attached["mountpoint"] if attached else ""
    source = mounts.get(os.path.realpath(mountpoint)) if mountpoint else None
    row.update(name=name, mountpoint=mountpoint if source else "", device=attached["device"] if attached else "",
               attached_host=driver.host_id if attached else "", containers=callers,
               drift=_drift(driver, name, attached, callers, source, row))
    row.setdefault("error", "")
    if row["status"].get("error") and not row["error"]:
        row["error"] = row["status"]["error"]
    return row


def _drift(driver, name: str, attached, callers: list, source, row: dict) -> list[str]:
    found = []
    if attached:
        if source is None:
            found.append(f"recorded mount {attached['mountpoint']} missing in kernel (not in /proc/self/mountinfo)")
        elif os.path.realpath(source) != os.path.realpath(attached["device"]):
            found.append(f"{attached['mountpoint']} is mounted from {source}, the state says {attached['device']}")
        if attached["device"] and not os.path.exists(attached["device"]):
            found.append(f"device {attached['device']} missing")
        if row["holder"] and row["holder"] != driver.host_id:
            found.append(f"attached here, but the backend names {row['holder']} its holder (lock lost?)")
        elif not row["holder"] and not row.get("error"):
            found.append("attached here, but the backend names no holder")
    elif callers:
        found.append(f"{len(callers)} container(s) recorded but no attachment")
    return found


def collect(driver, admin) -> dict:
    down = unreachable_backends(driver)
    catalog_down = getattr(driver.catalog, "name", None) in down
    if catalog_down:  # list from this host's state alone
        names = sorted({v["name"] for v in driver.state.volumes() if v["status"] == READY}
                       | {a["volume"] for a in driver.state.attachments()})
    else:
        names = [entry["Name"] for entry in driver.list()]
    mounts = mount_table()
    rows = [volume_row(driver, name, down, mounts) for name in names]
    drift = [f"volume {r['name']}: {x}" for r in rows for x in r["drift"]]
    attached = {a["mountpoint"] for a in driver.state.attachments()}
    root = os.path.realpath(driver.mount_root)
    for target in sorted(mounts):
        if os.path.dirname(target) == root and target not in attached:
            drift.append(f"{target} is mounted ({mounts[target]}) but in no state "
                         "(unmounted at the plugin's next start)")
    for backend_name, backend in driver.backends.items():
        if backend_name in down:
            continue
        try:
            recorded = {a["volume"] for a in driver.state.attachments()}
            for volume, device in sorted(backend.attached().items()):
                if volume not in recorded:
                    drift.append(f"volume {volume}: attached here as {device} by {backend_name}, but in no state")
        except PluginError as exc:
            drift.append(f"backend {backend_name}: attachments not readable: {exc}")
    return {"volumes": rows, "pools": admin.pools() if not down.get("lvm") else [], "drift": drift,
            "unreachable": down, "host_id": driver.host_id}


def render(report: dict, out=sys.stdout) -> None:
    for name, error in sorted(report["unreachable"].items()):
        print(f"backend {name} UNREACHABLE: {error} (volumes listed from this host's state)", file=out)
    rows = []
    for r in report["volumes"]:
        used = human(r["used"])
        if r["allocated_percent"] is not None:
            used = f"{used} ({r['allocated_percent']:g}% alloc)".strip()
        containers = ",".join(c[:12] for c in r["containers"])
        rows.append([r["name"], r["backend"], human(r["size"]), used, r["fs"], r["pool"], r["holder"],
                     containers, ",".join(r["snapshots"]), r["mountpoint"] or r["error"]])
    print(table(["VOLUME", "BACKEND", "SIZE", "USED", "FS", "POOL", "HOLDER", "CONTAINERS", "SNAPSHOTS",
                 "MOUNTPOINT"], rows), file=out)
    for pool in report["pools"]:
        where = f"thin pool {pool['vg']}/{pool['thin_pool']}"
        if "error" in pool:
            print(f"{where}: {pool['error']}", file=out)
            continue
        print(f"{where}: data {pool['data_percent']:g}%, metadata {pool['metadata_percent']:g}%, "
              f"provisioned {pool['overcommit']:g}x of {pool['size']} bytes ({human(pool['size'])})", file=out)
        if "warning" in pool:
            print(f"WARNING: {pool['warning']}", file=out)
    print(f"\nkernel (mounts, devices) and backend vs this host's state: "
          + ("as the state says" if not report["drift"] else "DRIFT"), file=out)
    for item in report["drift"]:
        print(f"  {item}", file=out)

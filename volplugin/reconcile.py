"""Start-up reconciliation of mount accounting with /proc/self/mountinfo and the backends.

Saved state alone is never trusted (docker-lvm-plugin#24): an attachment whose filesystem is no longer
mounted has lost its containers (host reboot, manual umount) and is released, and so is one left with no
caller (the last Unmount cut off before it unmounted). A mount or backend attachment that no state
explains (a crash between steps) is undone, and so is a Create a crash cut off (finished instead if its
record reached the shared catalog).
"""
import logging
import os

from . import filesystem, state as state_module

log = logging.getLogger("volplugin.reconcile")


def reconcile(driver) -> dict:
    summary = {"kept": 0, "released": 0, "orphan_mounts": 0, "orphan_attachments": 0, "unfinished_creates": 0}
    state = driver.state
    for attached in state.attachments():
        name = attached["volume"]
        mounted = filesystem.mount_source(attached["mountpoint"]) is not None
        if mounted and state.callers(name):
            summary["kept"] += 1
            continue
        if mounted:  # the last Unmount dropped its caller, then the plugin died before unmounting
            log.warning("volume %s is mounted with no caller left: finishing its last Unmount", name)
        else:
            log.warning("volume %s is no longer mounted: releasing it and its %d caller(s)", name,
                        len(state.callers(name)))
        try:
            driver._unmount_and_detach(name)
            summary["released"] += 1
        except Exception:  # noqa: BLE001 - one volume must not stop the rest
            log.exception("could not release volume %s", name)
    known = {a["volume"] for a in state.attachments()}
    for name, path in _mounted_under(driver.mount_root):
        if name not in known or os.path.dirname(path).endswith(".format"):
            log.warning("unmounting orphan mount %s", path)
            filesystem.unmount(path)
            summary["orphan_mounts"] += 1
    for backend in driver.backends.values():
        try:
            attached = backend.attached()
        except Exception:  # noqa: BLE001 - one unreachable backend must not stop the others
            log.exception("cannot list the %s backend's attachments", backend.name)
            continue
        for name in attached:
            volume = state.volume(name)
            if name in known or volume is None:
                continue
            log.warning("detaching orphan attachment of %s", name)
            backend.detach(driver._spec(name, volume))
            summary["orphan_attachments"] += 1
    for backend in driver.backends.values():
        try:  # e.g. a device mapped by a plugin that died before recording it
            cleaned = backend.cleanup_orphans()
        except Exception:  # noqa: BLE001
            log.exception("cleaning up the %s backend's orphans failed", backend.name)
            continue
        summary["orphan_attachments"] += len(cleaned)
    for volume in state.volumes():  # after the cleanups above: the image has no attachment left
        if volume["status"] == state_module.CREATING:
            try:
                with driver._lock(volume["name"]):
                    driver.undo_unfinished_create(volume["name"])
                summary["unfinished_creates"] += 1
            except Exception:  # noqa: BLE001 - retried at the next start or by a Remove
                log.exception("could not undo the unfinished creation of volume %s", volume["name"])
    log.info("reconciled: %s", summary)
    return summary


def _mounted_under(root: str) -> list[tuple[str, str]]:
    """(volume name, mount path) of every mount directly under ``root`` or its scratch ``.format``."""
    root = os.path.realpath(root)
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            target = filesystem.unescape(line.split()[4])
            if os.path.dirname(target) in (root, os.path.join(root, ".format")):
                found.append((os.path.basename(target), target))
    return found

"""Filesystems on attached block devices: mkfs that fits in Docker's 120 s, noatime mounts, the PGDATA
directory, freeze/thaw for crash-consistent snapshots, online grow. Commands go through plugincore.run."""
import logging
import os

from plugincore.run import CommandError, run

log = logging.getLogger("volplugin.filesystem")

# Lazy initialisation and no discard: mkfs of a large thin image takes seconds, not minutes (moby#37835).
MKFS = {
    "xfs": lambda dev: ["mkfs.xfs", "-q", "-K", dev],
    "ext4": lambda dev: ["mkfs.ext4", "-q", "-F", "-m", "0", "-E",
                         "lazy_itable_init=1,lazy_journal_init=1,nodiscard", dev],
}


def filesystem_type(device: str) -> str | None:
    """The filesystem on ``device`` as blkid probes it, or None for a blank device."""
    proc = run(["blkid", "-p", "-o", "value", "-s", "TYPE", device], timeout=30, check=False)
    if proc.returncode == 2:  # nothing recognised
        return None
    if proc.returncode != 0:
        raise CommandError(["blkid", device], proc.returncode, proc.stderr)
    return proc.stdout.strip() or None


def ensure_filesystem(device: str, fs: str) -> None:
    """mkfs unless ``device`` already carries ``fs`` (a repeated create must not wipe data)."""
    found = filesystem_type(device)
    if found == fs:
        return
    if found is not None:
        raise CommandError(["blkid", device], 0, f"device already holds a {found} filesystem, not {fs}")
    run(MKFS[fs](device), timeout=110)


def mount_source(mountpoint: str) -> str | None:
    """The device mounted at ``mountpoint`` per /proc/self/mountinfo (the kernel's truth), else None."""
    target = os.path.realpath(mountpoint)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if unescape(fields[4]) == target:
                sep = fields.index("-")
                return fields[sep + 2]
    return None


def used_in_other_namespaces(mountpoint: str) -> list[int]:
    """PIDs (one per mount namespace) of processes outside this mount namespace that have the
    filesystem mounted at ``mountpoint`` mounted too: a running container's copy of a volume mount.
    Only what this PID namespace shows (a managed plugin sees its own processes only)."""
    try:
        st = os.stat(mountpoint)
        own_ns = os.stat("/proc/self/ns/mnt").st_ino
    except OSError:
        return []
    device, seen, found = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}", {own_ns}, []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            ns = os.stat(f"/proc/{pid}/ns/mnt").st_ino
            if ns in seen:
                continue
            seen.add(ns)
            with open(f"/proc/{pid}/mountinfo") as f:
                if any(line.split()[2] == device for line in f):
                    found.append(int(pid))
        except OSError:  # gone meanwhile, or a kernel thread
            continue
    return found


def unescape(path: str) -> str:
    return path.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def mount(device: str, mountpoint: str, fs: str) -> None:
    os.makedirs(mountpoint, mode=0o755, exist_ok=True)
    if mount_source(mountpoint) is not None:
        return
    options = "noatime"
    if fs == "xfs":
        options += ",nouuid"  # clones of a snapshot carry the same XFS UUID as their source
    run(["mount", "-t", fs, "-o", options, device, mountpoint], timeout=60)


def unmount(mountpoint: str) -> None:
    if mount_source(mountpoint) is None:
        return
    run(["umount", mountpoint], timeout=60)


def prepare_pgdata(mountpoint: str, name: str, uid: int, gid: int) -> str:
    """The PGDATA directory: a subdirectory, since initdb refuses a root holding lost+found."""
    path = os.path.join(mountpoint, name)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        return path  # its owner may have changed it since: PostgreSQL's data is not ours to touch
    os.chown(path, uid, gid)
    os.chmod(path, 0o700)
    return path


def freeze(mountpoint: str) -> None:
    run(["fsfreeze", "--freeze", mountpoint], timeout=60)


def thaw(mountpoint: str) -> None:
    run(["fsfreeze", "--unfreeze", mountpoint], timeout=60)


def grow(device: str, mountpoint: str, fs: str) -> None:
    if fs == "xfs":
        run(["xfs_growfs", mountpoint], timeout=120)
    else:
        run(["resize2fs", device], timeout=120)


def usage(mountpoint: str) -> dict:
    st = os.statvfs(mountpoint)
    return {"size": st.f_blocks * st.f_frsize, "used": (st.f_blocks - st.f_bfree) * st.f_frsize}


def pg_version(mountpoint: str, pgdata: str) -> str:
    try:
        with open(os.path.join(mountpoint, pgdata, "PG_VERSION")) as f:
            return f.read().strip()
    except OSError:
        return ""

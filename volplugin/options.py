"""Validation of volume names and `-o` options, before anything touches the system."""
import re

from plugincore.errors import InvalidRequest

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
SNAPSHOT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_SIZE = re.compile(r"^(\d+)\s*([KMGT]i?B?|B)?$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
FILESYSTEMS = ("xfs", "ext4")
MIN_SIZE = 64 * 2**20
MIN_XFS_SIZE = 300 * 2**20  # mkfs.xfs refuses smaller filesystems
MAX_SIZE = 64 * 2**40

VOLUME_OPTIONS = {
    "size": "volume size: bytes or with a K/M/G/T suffix (powers of 1024); default from config",
    "fs": "filesystem: xfs or ext4",
    "uid": "owner of the PGDATA directory (default 999, the postgres user of the official image)",
    "gid": "group of the PGDATA directory (default 999)",
    "pgdata": "name of the PGDATA subdirectory created at the filesystem root",
    "backend": "storage backend: rbd (Ceph, follows the container across hosts) or lvm (thin LV on this host)",
    "pool": "RBD pool, or LVM thin pool in the configured volume group (default from config)",
    "from": "create as a clone of <volume>@<snapshot>",
}


def check_name(name, what: str = "volume name") -> str:
    if not isinstance(name, str) or not NAME.match(name) or ".." in name:
        raise InvalidRequest(f"{what} {name!r} is invalid: use 1-100 letters, digits, '_', '.', '-', "
                             "starting with a letter or digit")
    return name


def parse_size(value: str) -> int:
    match = _SIZE.match(str(value).strip())
    if not match:
        raise InvalidRequest(f"size {value!r} is not a size (examples: 20G, 512M, 10737418240)")
    unit = (match.group(2) or "").upper()[:1]
    size = int(match.group(1)) * _UNITS[unit]
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise InvalidRequest(f"size {value} is outside 64M..64T")
    return size


def _id(value: str, key: str) -> int:
    if not str(value).isdigit() or int(value) > 2**31 - 1:
        raise InvalidRequest(f"{key} {value!r} is not a numeric id")
    return int(value)


def parse_from(value: str) -> tuple[str, str]:
    volume, sep, snap = str(value).partition("@")
    if not sep:
        raise InvalidRequest(f"from={value!r}: expected <volume>@<snapshot>")
    return check_name(volume, "source volume"), check_snapshot(snap)


def check_snapshot(name) -> str:
    if not isinstance(name, str) or not SNAPSHOT.match(name):
        raise InvalidRequest(f"snapshot name {name!r} is invalid: use 1-64 letters, digits, '_', '.', '-'")
    return name


def parse_volume_options(opts: dict | None, defaults: dict) -> dict:
    """Normalised options of a new volume; ``defaults`` carries size, fs, uid, gid, pgdata, backend, pool."""
    opts = opts or {}
    if not isinstance(opts, dict):
        raise InvalidRequest("Opts must be an object")
    unknown = sorted(set(opts) - set(VOLUME_OPTIONS))
    if unknown:
        raise InvalidRequest(f"unknown option {', '.join(unknown)} (valid: {', '.join(sorted(VOLUME_OPTIONS))})")
    merged = {**defaults, **{k: str(v) for k, v in opts.items()}}
    fs = merged["fs"].lower()
    if fs not in FILESYSTEMS:
        raise InvalidRequest(f"fs {merged['fs']!r} is not supported (valid: {', '.join(FILESYSTEMS)})")
    result = {
        "size": parse_size(merged["size"]),
        "fs": fs,
        "uid": _id(merged["uid"], "uid"),
        "gid": _id(merged["gid"], "gid"),
        "pgdata": check_name(merged["pgdata"], "pgdata directory name"),
        "backend": merged["backend"],
        "pool": check_name(merged["pool"], "pool") if merged.get("pool") else "",
    }
    if fs == "xfs" and result["size"] < MIN_XFS_SIZE:
        raise InvalidRequest(f"size {merged['size']} is too small for xfs (at least 300M; or use -o fs=ext4)")
    if merged.get("from"):
        result["from"] = "@".join(parse_from(merged["from"]))
    return result

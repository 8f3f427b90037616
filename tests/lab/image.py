"""A tiny test image: the host's static busybox plus applet symlinks, as a tar for ``docker import``.

Build the tar once per pytest session (build_busybox_tar) and import it into each test dockerd
(Dockerd.import_image): importing takes ~0.1 s.
"""
from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

from . import BUSYBOX, sh

IMAGE = "netplugin-test/busybox:1"
# Applets the tests rely on; every other applet the host's busybox knows is linked as well.
REQUIRED_APPLETS = ("sh", "ip", "ping", "sleep", "cat", "nc", "ls", "ifconfig", "route",
                    "arping", "wget", "hostname")
EMPTY_DIRS = ("etc", "proc", "sys", "dev", "tmp", "root", "var", "run")


def _applets() -> list[str]:
    listed = sh([BUSYBOX, "--list"], timeout=10).stdout.split()
    return sorted((set(listed) | set(REQUIRED_APPLETS)) - {"busybox"})


def build_busybox_tar(dest: Path) -> Path:
    """Write ``dest`` (a root filesystem tar: /bin/busybox, /bin/<applet> symlinks, empty
    /etc /proc /sys /dev /tmp ...) and return it. Pure Python: no rootfs dir on disk."""
    dest = Path(dest)

    def add_dir(tar, name):
        info = tarfile.TarInfo(name)
        info.type, info.mode = tarfile.DIRTYPE, 0o1777 if name == "tmp" else 0o755
        tar.addfile(info)

    with tarfile.open(dest, "w") as tar:
        for name in ("bin", *EMPTY_DIRS):
            add_dir(tar, name)
        tar.add(os.path.realpath(BUSYBOX), arcname="bin/busybox", recursive=False)
        for applet in _applets():
            info = tarfile.TarInfo(f"bin/{applet}")
            info.type, info.linkname, info.mode = tarfile.SYMTYPE, "busybox", 0o777
            tar.addfile(info)
        hosts = b"127.0.0.1 localhost\n"
        info = tarfile.TarInfo("etc/hosts")
        info.size, info.mode = len(hosts), 0o644
        tar.addfile(info, io.BytesIO(hosts))
    return dest

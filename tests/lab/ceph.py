"""Throwaway single-node Ceph clusters (volplugin.cephlab.EmbeddedCeph) for tests.

Each cluster lives in a directory named ``nplab-<pid>-ceph-<n>`` (LAB_PREFIX) under a temporary
directory the caller gives. The pid in the name tells a later run which daemons a killed run left
behind (stop_stale_clusters), the same convention as the lab's network namespaces. Daemons are only
ever matched by their own command line: ceph-mon/ceph-osd with ``-c <that directory>/ceph.conf``.
"""
from __future__ import annotations

import importlib.util
import itertools
import os
import re
import shutil

from volplugin.cephlab import CEPH_MON, CEPH_OSD, MONMAPTOOL, EmbeddedCeph

from . import LAB_PREFIX, ProcRef, end_processes, register_cleanup

_ids = itertools.count()
_live: list[EmbeddedCeph] = []
_DAEMONS = {os.path.basename(CEPH_MON), os.path.basename(CEPH_OSD)}
_STALE_CONF = re.compile(r"/nplab-(\d+)-ceph-\d+/ceph\.conf$")


def skip_reason() -> str | None:
    """Why a cluster can't run here, or None."""
    if os.geteuid() != 0:
        return "an embedded Ceph cluster needs root"
    for path in (CEPH_MON, CEPH_OSD, MONMAPTOOL):
        if not os.access(path, os.X_OK):
            return f"{path} is missing (bash scripts/setup installs it)"
    # find_spec, not import: importing rados costs ~1 s in the VM lane, whose suite never needs it
    if importlib.util.find_spec("rados") is None or importlib.util.find_spec("rbd") is None:
        return "the python3-rados/python3-rbd bindings are missing (bash scripts/setup)"
    return None


def throwaway_cluster(tmp_dir, *, start: bool = True, **options) -> EmbeddedCeph:
    """A new cluster in ``tmp_dir`` on free loopback ports, running unless ``start`` is False.
    ``options`` go to EmbeddedCeph (store_gib, watch_timeout...). Stopped at the latest by the
    lab's last-resort cleanup; destroy_cluster() removes it."""
    directory = os.path.join(str(tmp_dir), f"{LAB_PREFIX}ceph-{next(_ids)}")
    cluster = EmbeddedCeph(directory, **options)  # mon_port 0: it picks free ports itself
    _live.append(cluster)
    if start:
        cluster.ensure_running()
    return cluster


def destroy_cluster(cluster: EmbeddedCeph) -> None:
    """Stop the cluster (killing whatever ignores that) and remove its directory."""
    stop_hard(cluster)
    shutil.rmtree(cluster.directory, ignore_errors=True)
    if cluster in _live:
        _live.remove(cluster)


def stop_hard(cluster: EmbeddedCeph) -> None:
    """stop(), then end any daemon still running with this cluster's conf: a corrupted or
    missing pid file must not leave a daemon behind."""
    try:
        cluster.stop(timeout=10)
    finally:
        end_processes(daemons_of(cluster.conf_path))


def daemons_of(conf_path: str) -> list[ProcRef]:
    """Live ceph-mon/ceph-osd processes started with ``-c conf_path``."""
    return [ProcRef(pid) for pid, argv in _ceph_daemons() if conf_path in argv]


def stale_clusters() -> dict[str, list[ProcRef]]:
    """Daemons of clusters whose test process is gone (a killed run), by conf path."""
    stale: dict[str, list[ProcRef]] = {}
    for pid, argv in _ceph_daemons():
        for arg in argv:
            match = _STALE_CONF.search(arg)
            if match and not os.path.exists(f"/proc/{match.group(1)}"):
                stale.setdefault(arg, []).append(ProcRef(pid))
    return stale


def stop_stale_clusters() -> list[str]:
    """End what stale_clusters() finds (by hand: python -c 'import tests.lab.ceph as c;
    print(c.stop_stale_clusters())'); returns their conf paths."""
    stale = stale_clusters()
    for refs in stale.values():
        end_processes(refs, timeout=10)
    return sorted(stale)


def _ceph_daemons() -> list[tuple[int, list[str]]]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if os.path.basename(argv[0]) in _DAEMONS:
            found.append((int(entry), argv))
    return found


def stop_all_clusters() -> None:
    """Last resort (session end, atexit): stop every cluster this process created."""
    for cluster in list(_live):
        stop_hard(cluster)


# After plugins (0), dockerds (1) and network namespaces (2): those may be Ceph clients.
register_cleanup(3, stop_all_clusters)

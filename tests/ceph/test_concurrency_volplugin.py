"""Concurrency against served volplugins on the test Ceph: parallel requests for one volume from many
threads (spread over gunicorn's worker processes) and from two hosts at once. The per-volume locks
serialize them: one Create wins and the others agree or get a clear Conflict; many Mounts share one
attachment and the last Unmount detaches; two hosts racing for one volume never both get it."""
import signal
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.lab import mounts_under
from tests.lab.ceph import daemons_of
from tests.lab.plugin import rbd_volplugin
from tests.ceph.test_two_hosts import hosts  # noqa: F401 - the fixture: two plugin processes on one Ceph

pytestmark = pytest.mark.kernel
THREADS = 12


def _parallel(fn, items):
    with ThreadPoolExecutor(THREADS) as pool:
        return list(pool.map(fn, items))


def test_parallel_creates_of_one_name_agree_or_conflict(hosts):
    a, _ = hosts
    same, differing = "cs" + uuid.uuid4().hex[:8], "cd" + uuid.uuid4().hex[:8]
    opts = {"size": "256M", "fs": "ext4"}
    replies = _parallel(lambda _: a.call("/VolumeDriver.Create", {"Name": same, "Opts": opts}), range(THREADS))
    assert all(not r.get("Err") for r in replies), replies

    sizes = [f"{256 + 64 * i}M" for i in range(THREADS)]
    replies = _parallel(lambda s: a.call("/VolumeDriver.Create", {"Name": differing, "Opts": {**opts, "size": s}}),
                        sizes)
    won = [s for s, r in zip(sizes, replies) if not r.get("Err")]
    assert len(won) == 1, replies
    assert all("already exists" in r["Err"] for r in replies if r.get("Err")), replies
    names = [v["Name"] for v in a.call("/VolumeDriver.List", {})["Volumes"]]
    assert names.count(same) == 1 and names.count(differing) == 1
    for name in (same, differing):
        assert not a.call("/VolumeDriver.Remove", {"Name": name}).get("Err")


def test_parallel_mounts_share_one_attachment_and_the_last_unmount_detaches(hosts):
    a, _ = hosts
    name = "cm" + uuid.uuid4().hex[:8]
    assert not a.call("/VolumeDriver.Create", {"Name": name, "Opts": {"size": "256M", "fs": "ext4"}}).get("Err")
    callers = [f"c{i}" for i in range(THREADS * 2)]
    replies = _parallel(lambda c: a.call("/VolumeDriver.Mount", {"Name": name, "ID": c}), callers)
    assert all(not r.get("Err") for r in replies), replies
    assert len({r["Mountpoint"] for r in replies}) == 1
    status = a.call("/VolumeDriver.Get", {"Name": name})["Volume"]["Status"]
    assert sorted(status["containers"]) == sorted(callers)
    # half of them go while the other half mount again (Docker's IDs are unique: new ones)
    again = [f"d{i}" for i in range(THREADS)]
    work = [("/VolumeDriver.Unmount", c) for c in callers] + [("/VolumeDriver.Mount", c) for c in again]
    replies = _parallel(lambda rc: a.call(rc[0], {"Name": name, "ID": rc[1]}), work)
    assert all(not r.get("Err") for r in replies), replies
    mountpoint = a.call("/VolumeDriver.Path", {"Name": name})["Mountpoint"]
    assert mountpoint and Path(mountpoint, "pgdata").is_dir()
    assert sorted(a.call("/VolumeDriver.Get", {"Name": name})["Volume"]["Status"]["containers"]) == sorted(again)
    _parallel(lambda c: a.call("/VolumeDriver.Unmount", {"Name": name, "ID": c}), again)
    assert a.call("/VolumeDriver.Path", {"Name": name})["Mountpoint"] == ""
    assert not mounts_under(a.workdir)
    assert not a.call("/VolumeDriver.Remove", {"Name": name}).get("Err")


def test_two_hosts_racing_for_one_volume_never_both_get_it(hosts):
    a, b = hosts
    name = "cr" + uuid.uuid4().hex[:8]
    assert not a.call("/VolumeDriver.Create", {"Name": name, "Opts": {"size": "256M", "fs": "ext4"}}).get("Err")
    work = [(a, f"a{i}") for i in range(THREADS // 2)] + [(b, f"b{i}") for i in range(THREADS // 2)]
    replies = _parallel(lambda pc: (pc[0], pc[1], pc[0].call("/VolumeDriver.Mount", {"Name": name, "ID": pc[1]})),
                        work)
    winners = {p.name for p, _, r in replies if not r.get("Err")}
    assert len(winners) == 1, [r for _, _, r in replies]
    holder = a if winners == {a.name} else b
    refused = [r["Err"] for p, _, r in replies if p is not holder]
    host = "hostA" if holder is a else "hostB"
    assert refused and all(f"in use on host {host}" in e for e in refused), refused
    loser = b if holder is a else a
    assert loser.call("/VolumeDriver.Path", {"Name": name})["Mountpoint"] == ""
    for _, caller, reply in replies:
        if not reply.get("Err"):
            assert not holder.call("/VolumeDriver.Unmount", {"Name": name, "ID": caller}).get("Err")
    assert not mounts_under(a.workdir) and not mounts_under(b.workdir)
    assert not a.call("/VolumeDriver.Remove", {"Name": name}).get("Err")


def test_a_stalled_ceph_does_not_block_unrelated_requests(own_ceph, tmp_path):
    """Every OSD stopped (SIGSTOP: requests to it hang, nothing fails) while a Mount waits on Ceph: requests
    that need no Ceph answer at once from other worker threads, and the stalled Mount ends with a clear error
    within op_timeout instead of hanging."""
    plugin = rbd_volplugin(tmp_path, own_ceph, prefix="vpslow", op_timeout=6.0).start()
    osds = [p for p in daemons_of(own_ceph.conf_path) if "ceph-osd" in open(f"/proc/{p.pid}/cmdline").read()]
    stalled = []
    try:
        for name in ("slowa", "slowb"):
            reply = plugin.call("/VolumeDriver.Create", {"Name": name, "Opts": {"size": "128M", "fs": "ext4"}})
            assert not reply.get("Err"), reply
        mountpoint = plugin.call("/VolumeDriver.Mount", {"Name": "slowb", "ID": "b1"})["Mountpoint"]
        for osd in osds:
            osd.signal(signal.SIGSTOP)
            stalled.append(osd)
        with ThreadPoolExecutor(1) as pool:
            started = time.monotonic()
            mount = pool.submit(plugin.call, "/VolumeDriver.Mount", {"Name": "slowa", "ID": "a1"}, 120)
            time.sleep(1.0)
            assert not mount.done(), "the Mount should be waiting on the stalled cluster"
            for route, body, want in (("/VolumeDriver.Capabilities", {}, {"Capabilities": {"Scope": "global"}}),
                                      ("/VolumeDriver.Path", {"Name": "slowb"}, {"Mountpoint": mountpoint}),
                                      ("/VolumeDriver.Unmount", {"Name": "slowb", "ID": "stranger"}, {}),
                                      ("/Plugin.Activate", {}, {"Implements": ["VolumeDriver"]})):
                asked = time.monotonic()
                reply = plugin.call(route, body, 30)
                assert time.monotonic() - asked < 1.0, f"{route} waited behind the stalled Mount"
                assert {k: v for k, v in reply.items() if k != "Err" or v} == want, (route, reply)
            reply = mount.result(timeout=60)
            waited = time.monotonic() - started
        print(f"\nstalled Mount answered after {waited:.1f} s: {reply}")
        assert reply.get("Err") and waited < 6.0 * 3 + 10, reply
        assert "Traceback" not in reply["Err"]
    finally:
        for osd in stalled:
            osd.signal(signal.SIGCONT)
        for name, caller in (("slowa", "a1"), ("slowb", "b1")):
            plugin.call("/VolumeDriver.Unmount", {"Name": name, "ID": caller}, 120)
        plugin.destroy()
    assert not mounts_under(tmp_path)

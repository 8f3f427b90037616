"""Two volplugin processes (hosts A and B: own host identity, state directory and socket) on one Ceph
cluster, driven over their sockets like dockerd drives them: a volume changes hands, a concurrent mount
is refused naming the holder, and a kill -9 of A's plugin does not let B in while A still writes."""
import os
import sys
import uuid
from pathlib import Path

import pytest

from tests.lab.plugin import Plugin

pytestmark = pytest.mark.kernel


def _host(ceph, root: Path, host_id: str) -> Plugin:
    root.mkdir(parents=True)
    config = root / "volplugin.toml"
    config.write_text(f'host_id = "{host_id}"\n[rbd]\nconf = "{ceph.conf_path}"\npool = "{ceph.pool}"\n'
                      'fence_grace = 2.0\nconnect_timeout = 5.0\nop_timeout = 15.0\n')
    plugin = Plugin(None, root, name=f"vp{host_id}{os.urandom(3).hex()}",
                    command=[sys.executable, "-m", "volplugin"],
                    extra_args=("--config", str(config)))
    return plugin.start()


@pytest.fixture
def hosts(ceph, tmp_path):
    started = []
    try:
        for host_id in ("hostA", "hostB"):
            started.append(_host(ceph, tmp_path / host_id, host_id))
        yield started
    finally:
        for plugin in started:  # release what a failed test left mounted, then stop
            if not plugin.alive():
                plugin.start()
            for volume in plugin.call("/VolumeDriver.List", {}).get("Volumes", []):
                for caller in ("a1", "a2", "b1", "b2"):
                    plugin.call("/VolumeDriver.Unmount", {"Name": volume["Name"], "ID": caller})
        for plugin in started:
            for volume in plugin.call("/VolumeDriver.List", {}).get("Volumes", []):
                plugin.call("/VolumeDriver.Remove", {"Name": volume["Name"]})
            plugin.destroy()


def ok(reply: dict) -> dict:
    assert not reply.get("Err"), reply
    return reply


def test_volume_changes_hands_between_plugin_processes(hosts):
    a, b = hosts
    name = "h" + uuid.uuid4().hex[:10]
    ok(a.call("/VolumeDriver.Create", {"Name": name, "Opts": {"size": "256M", "fs": "ext4"}}))
    assert ok(b.call("/VolumeDriver.Get", {"Name": name}))["Volume"]["Name"] == name

    mountpoint = ok(a.call("/VolumeDriver.Mount", {"Name": name, "ID": "a1"}))["Mountpoint"]
    Path(mountpoint, "pgdata", "owner").write_text("A")
    refused = b.call("/VolumeDriver.Mount", {"Name": name, "ID": "b1"})
    assert "in use on host hostA" in refused["Err"]

    a.kill()  # the plugin process dies; its attachment (and so its writer) lives on
    refused = b.call("/VolumeDriver.Mount", {"Name": name, "ID": "b1"})
    assert "in use on host hostA" in refused["Err"], "A's mount is alive: no takeover"
    a.start()
    ok(a.call("/VolumeDriver.Unmount", {"Name": name, "ID": "a1"}))  # the restarted A still knows a1

    mountpoint_b = ok(b.call("/VolumeDriver.Mount", {"Name": name, "ID": "b1"}))["Mountpoint"]
    assert Path(mountpoint_b, "pgdata", "owner").read_text() == "A"
    assert ok(b.call("/VolumeDriver.Get", {"Name": name}))["Volume"]["Status"]["attached_host"] == "hostB"
    ok(a.call("/VolumeDriver.Unmount", {"Name": name, "ID": "b1"}))  # A never held b1: B keeps it
    assert ok(b.call("/VolumeDriver.Path", {"Name": name}))["Mountpoint"] == mountpoint_b
    ok(b.call("/VolumeDriver.Unmount", {"Name": name, "ID": "b1"}))
    ok(a.call("/VolumeDriver.Remove", {"Name": name}))
    assert name not in [v["Name"] for v in ok(b.call("/VolumeDriver.List", {}))["Volumes"]]

"""The volume driver (Docker protocol semantics, mount accounting, PGDATA, admin operations) on the real
RBD backend and a real single-node Ceph; two "hosts" are two driver instances with their own host
identity and state directory."""
import os
import stat
import subprocess
import uuid

import pytest

from plugincore.errors import Conflict, NotFound
from tests.lab import sh, wait_for_own_mount_namespace
from tests.lab.rbd import Hosts
from volplugin import config as volconfig
from volplugin import filesystem
from volplugin.admin import Admin
from volplugin.reconcile import reconcile
from volplugin.service import Services

pytestmark = pytest.mark.kernel


class Cluster:
    """Hosts running volume drivers on one Ceph cluster."""

    def __init__(self, ceph, root):
        self.ceph = ceph
        self.hosts = Hosts(ceph, root)
        self.root = root

    def driver(self, host_id: str, state_dir=None):
        backend = self.hosts.host(host_id)
        config = volconfig.load(overrides={"state_dir": str(state_dir or self.root / f"{host_id}-state"),
                                           "host_id": host_id}, environ={})
        config["rbd"].update(conf=self.ceph.conf_path, pool=self.ceph.pool)
        return Services(config, backends={"rbd": backend}).driver

    def name(self) -> str:
        name = "v" + uuid.uuid4().hex[:10]
        self.hosts.images.append((self.ceph.pool, name))
        return name

    def cleanup(self):
        # the volumes' filesystems only: rbd-fuse's own mounts stay for the hosts' detach, which needs
        # their paths to find the loop devices over them
        with open("/proc/self/mountinfo") as f:
            ours = [filesystem.unescape(line.split()[4]) for line in f
                    if str(self.root) in line.split()[4] and " - fuse.rbd-fuse " not in line]
        for target in sorted(ours, key=len, reverse=True):
            sh(["umount", "-l", target], check=False, timeout=30)
        return self.hosts.cleanup()


@pytest.fixture
def cluster(ceph, tmp_path):
    c = Cluster(ceph, tmp_path)
    yield c
    assert c.cleanup() == []


def _mount_options(mountpoint: str) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == mountpoint:
                return fields[5].split(",")
    return []


def test_mount_accounting_and_pgdata(cluster):
    a = cluster.driver("hostA")
    name = cluster.name()
    a.create(name, {"size": "512M", "fs": "ext4", "uid": "999", "gid": "999"})
    assert a.path(name) == ""
    mountpoint = a.mount(name, "c1")
    pgdata = os.path.join(mountpoint, "pgdata")
    st = os.stat(pgdata)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (999, 999, 0o700)
    assert "noatime" in _mount_options(mountpoint)
    with open(os.path.join(mountpoint, "data.txt"), "w") as f:
        f.write("hello")
    assert a.mount(name, "c2") == mountpoint  # a second container: same mount
    a.unmount(name, "c1")
    a.unmount(name, "stranger")  # unknown caller: nothing happens
    a.unmount(name, "c1")  # repeated: counted once, so still mounted for c2
    assert filesystem.mount_source(mountpoint) is not None
    status = a.get(name)["Status"]
    assert status["containers"] == ["c2"] and status["attached_host"] == "hostA" and status["fs"] == "ext4"
    a.unmount(name, "c2")
    assert filesystem.mount_source(mountpoint) is None and a.path(name) == ""
    assert list(a.backends["rbd"].attached()) == []


def test_volume_follows_the_container_to_another_host(cluster):
    a, b = cluster.driver("hostA"), cluster.driver("hostB")
    name = cluster.name()
    a.create(name, {"size": "512M"})  # xfs by default
    assert name in [v["Name"] for v in b.list()], "B sees A's volume (scope global)"
    mountpoint = a.mount(name, "c1")
    with open(os.path.join(mountpoint, "pgdata", "row"), "w") as f:
        f.write("42")
    with pytest.raises(Conflict, match="in use on host hostA"):
        b.mount(name, "c9")
    b.unmount(name, "c9")  # B's Unmount for its failed Mount must not detach A's volume
    assert filesystem.mount_source(mountpoint) is not None
    a.unmount(name, "c1")
    mountpoint_b = b.mount(name, "c2")
    with open(os.path.join(mountpoint_b, "pgdata", "row")) as f:
        assert f.read() == "42"
    assert b.get(name)["Status"]["attached_host"] == "hostB"
    b.unmount(name, "c2")


def test_restarted_plugin_keeps_and_reconciles_mounts(cluster, tmp_path):
    a = cluster.driver("hostA", state_dir=tmp_path / "stateA")
    name = cluster.name()
    a.create(name, {"size": "512M", "fs": "ext4"})
    mountpoint = a.mount(name, "c1")
    # A plugin killed with -9 and started again: same state directory, new process objects.
    again = cluster.driver("hostA", state_dir=tmp_path / "stateA")
    assert reconcile(again)["kept"] == 1
    assert again.mount(name, "c2") == mountpoint
    again.unmount(name, "c1")
    again.unmount(name, "c2")
    assert filesystem.mount_source(mountpoint) is None
    # A mount that vanished behind the plugin's back (host reboot): reconcile releases it.
    again.mount(name, "c3")
    sh(["umount", mountpoint])
    assert reconcile(cluster.driver("hostA", state_dir=tmp_path / "stateA"))["released"] == 1
    assert again.state.callers(name) == [] and list(again.backends["rbd"].attached()) == []


def test_snapshot_clone_rollback_grow(cluster):
    a = cluster.driver("hostA")
    admin = Admin(a)
    name, clone = cluster.name(), cluster.name()
    a.create(name, {"size": "512M"})
    mountpoint = a.mount(name, "c1")
    path = os.path.join(mountpoint, "pgdata", "v")
    with open(path, "w") as f:
        f.write("v1")
    admin.snapshot_create(name, "s1")  # mounted: frozen around the snapshot
    with open(path, "w") as f:
        f.write("v2")
    assert [s["name"] for s in admin.snapshot_list(name)] == ["s1"]

    a.create(clone, {"from": f"{name}@s1"})
    with open(os.path.join(a.mount(clone, "c2"), "pgdata", "v")) as f:
        assert f.read() == "v1", "the clone starts from the snapshot"
    a.unmount(clone, "c2")

    before = filesystem.usage(mountpoint)["size"]
    admin.grow(name, "1G")
    assert filesystem.usage(mountpoint)["size"] > before * 1.5, "mounted filesystem grown online"
    assert a.get(name)["Status"]["size"] == 1 << 30

    with pytest.raises(Conflict, match="mounted"):
        admin.snapshot_rollback(name, "s1")
    a.unmount(name, "c1")
    a.remove(clone)
    admin.snapshot_rollback(name, "s1")
    with open(os.path.join(a.mount(name, "c3"), "pgdata", "v")) as f:
        assert f.read() == "v1"
    a.unmount(name, "c3")


def test_create_remove_rules(cluster):
    a = cluster.driver("hostA")
    name = cluster.name()
    a.create(name, {"size": "512M", "fs": "ext4"})
    a.create(name, {"size": "512M"})  # same options again: fine (idempotent)
    a.create(name, None)  # `-v name:/path` sends no options: fine
    with pytest.raises(Conflict, match="different options"):
        a.create(name, {"size": "1G"})
    with pytest.raises(NotFound, match="source volume"):
        a.create(cluster.name(), {"from": "nosuchvolume@s1"})
    a.mount(name, "c1")
    holder = subprocess.Popen(["unshare", "--mount", "sleep", "300"])  # a container's copy of the mount
    try:
        wait_for_own_mount_namespace(holder.pid)
        with pytest.raises(Conflict, match="mounted on this host by 1 container.* still in use"):
            a.remove(name)
    finally:
        holder.kill()
        holder.wait()
    a.unmount(name, "c1")
    a.remove(name)
    a.remove(name)  # unknown now: success
    assert name not in [v["Name"] for v in a.list()]
    with pytest.raises(NotFound):
        a.get(name)

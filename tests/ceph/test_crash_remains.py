"""What a plugin killed in the middle of an operation leaves behind, found by the volume torture
(tests/ceph/test_torture_volplugin.py), each cleaned or tolerated by the next start or request. The
remains are made the way the kill left them (the same records and objects, written directly), since a
kill cannot be placed between two librbd calls on demand."""
import os
import subprocess
import threading
import time

import pytest
import rados

from plugincore.errors import Conflict
from tests.ceph.test_volume_driver import Cluster, cluster  # noqa: F401 - the fixture
from tests.lab import wait_for_own_mount_namespace
from tests.lab.ceph import destroy_cluster, throwaway_cluster
from volplugin.backends import rbd_locks as locks
from volplugin.backends.base import VolumeSpec
from volplugin.options import parse_volume_options
from volplugin.reconcile import reconcile
from volplugin.state import CREATING

pytestmark = pytest.mark.kernel


def _image_ioctx(ceph):
    client = rados.Rados(conffile=ceph.conf_path)
    client.connect(timeout=30)
    return client, client.open_ioctx(ceph.pool)


def _images(ceph) -> list[str]:
    import rbd
    client, ioctx = _image_ioctx(ceph)
    try:
        return rbd.RBD().list(ioctx)
    finally:
        ioctx.close()
        client.shutdown()


def test_a_create_cut_off_is_undone_at_start_up(cluster, tmp_path):
    a = cluster.driver("hostA", state_dir=tmp_path / "stateA")
    name = cluster.name()
    options = parse_volume_options({"size": "64M", "fs": "ext4"}, a.defaults)
    a.state.put_volume(name, options, {}, CREATING)  # killed after making the image, before READY
    a.backends["rbd"].create(VolumeSpec(name=name, size=options["size"]))
    assert name in _images(cluster.ceph)

    again = cluster.driver("hostA", state_dir=tmp_path / "stateA")
    assert reconcile(again)["unfinished_creates"] == 1
    assert name not in _images(cluster.ceph) and again.state.volume(name) is None
    again.create(name, {"size": "64M", "fs": "ext4"})  # Docker's user may create the name again
    assert again.mount(name, "c1")
    again.unmount(name, "c1")
    again.remove(name)


def test_the_remains_of_a_half_created_image_are_removed(cluster):
    """Killed inside librbd's create: the directory lists the image, its header object was never
    written, so it cannot be opened. Remove (and so start-up's undo of the create) cleans it."""
    import rbd
    a = cluster.driver("hostA")
    name = cluster.name()
    backend = a.backends["rbd"]
    spec = VolumeSpec(name=name, size=64 << 20)
    backend.create(spec)
    client, ioctx = _image_ioctx(cluster.ceph)
    try:
        with rbd.Image(ioctx, name, read_only=True) as image:
            header = locks.header_oid(image)
        ioctx.remove_object(header)
        with pytest.raises(rbd.ImageNotFound):
            rbd.Image(ioctx, name, read_only=True)
    finally:
        ioctx.close()
        client.shutdown()
    assert name in _images(cluster.ceph)
    backend.remove(spec)
    assert name not in _images(cluster.ceph)
    backend.remove(spec)  # and again: unknown is fine


def test_own_leftover_claims_neither_block_nor_stay(cluster):
    """A Remove killed holding its maintenance claim: the repeated Remove takes the claim over (it was
    refused for good before). An attach killed between claiming and recording: the intent record
    lets start-up cleanup release the claim."""
    a = cluster.driver("hostA")
    backend = a.backends["rbd"]
    name = cluster.name()
    a.create(name, {"size": "64M", "fs": "ext4"})
    spec = a._spec(name, a.state.volume(name))

    def write_claim(op: str = "") -> None:
        client, ioctx = _image_ioctx(cluster.ceph)
        try:
            import rbd
            with rbd.Image(ioctx, name, read_only=True) as image:
                assert locks.swap_record(ioctx, locks.header_oid(image), "", locks.new_record("hostA", op=op))
        finally:
            ioctx.close()
            client.shutdown()

    write_claim()  # the attach's claim ...
    backend.records.save({"volume": name, "pool": backend.pool, "image": name, "broken": "attaching"})
    assert backend.holder(spec).host == "hostA"
    assert name in backend.cleanup_orphans()  # ... released by the next start
    assert backend.holder(spec) is None and backend.records.all() == []

    write_claim(op="remove")  # a Remove killed after claiming
    a.remove(name)
    assert name not in _images(cluster.ceph)


def test_a_last_unmount_cut_off_is_finished_at_start_up(cluster, tmp_path):
    a = cluster.driver("hostA", state_dir=tmp_path / "stateA")
    name = cluster.name()
    a.create(name, {"size": "64M", "fs": "ext4"})
    mountpoint = a.mount(name, "c1")
    a.state.remove_caller(name, "c1")  # the last Unmount's first step; killed before unmounting
    again = cluster.driver("hostA", state_dir=tmp_path / "stateA")
    assert reconcile(again)["released"] == 1
    assert not os.path.ismount(mountpoint) and again.backends["rbd"].attached() == {}
    assert again.state.attachment(name) is None
    again.remove(name)


def test_remove_drops_mount_ids_docker_never_learnt(cluster):
    """A Mount whose reply a kill cut off: the plugin recorded the ID, Docker never learnt it and never
    unmounts it. Docker's Remove (sent only when no container of its own uses the volume) unmounts and
    removes it, unless some process outside the plugin's mount namespace still has the filesystem."""
    a = cluster.driver("hostA")
    name = cluster.name()
    a.create(name, {"size": "64M", "fs": "ext4"})
    mountpoint = a.mount(name, "lost-reply")
    holder = subprocess.Popen(["unshare", "--mount", "sleep", "300"])  # a container's copy of the mount
    try:
        wait_for_own_mount_namespace(holder.pid)
        with pytest.raises(Conflict, match=f"still in use \\(process {holder.pid} has it mounted\\)"):
            a.remove(name)
    finally:
        holder.kill()
        holder.wait()
    assert a.state.callers(name) == ["lost-reply"]
    a.remove(name)
    assert a.state.volume(name) is None and not os.path.ismount(mountpoint)
    assert name not in _images(cluster.ceph) and a.backends["rbd"].attached() == {}


def test_the_writer_waits_out_an_osd_outage_longer_than_the_client_timeout(tmp_path):
    """Data synced before an OSD outage survives an unmount during it, even when the outage outlasts the
    conf's client op timeout (3 s here): the writer (rbd-fuse) must not give up on writes. With the
    timeout inherited it returned EIO under ext4 and the synced file was lost."""
    ceph = throwaway_cluster(tmp_path / "ceph", store_gib=2, client_timeout=3)
    cluster_ = Cluster(ceph, tmp_path / "hosts")
    try:
        a = cluster_.driver("hostA")
        name = cluster_.name()
        a.create(name, {"size": "64M", "fs": "ext4"})
        mountpoint = a.mount(name, "c1")
        with open(os.path.join(mountpoint, "synced"), "w") as f:
            f.write("before the outage\n")
            f.flush()
            os.fsync(f.fileno())
        ceph.stop_osd()
        errors = []
        unmount = threading.Thread(target=lambda: _capture(errors, a.unmount, name, "c1"))
        unmount.start()
        time.sleep(6)  # twice the client timeout
        ceph.start_osd()
        unmount.join(120)
        assert not unmount.is_alive() and errors == []
        mountpoint = a.mount(name, "c2")
        with open(os.path.join(mountpoint, "synced")) as f:
            assert f.read() == "before the outage\n"
        a.unmount(name, "c2")
        a.remove(name)
    finally:
        errors = cluster_.cleanup()
        destroy_cluster(ceph)
    assert errors == []


def _capture(errors: list, fn, *args) -> None:
    try:
        fn(*args)
    except Exception as exc:  # noqa: BLE001 - reported by the test
        errors.append(exc)

"""volplugin's garbage collection against Docker's containers (volplugin/docker_gc.py) on the real RBD
backend: a volume whose mount IDs no running container explains (a Mount whose reply a crash cut off) is
unmounted and detached after the grace, so another host may take it; Docker's containers' volumes, a
volume a container in another mount namespace still has, and a Mount since the first pass are kept.
Docker's answer (the volumes its running containers mount) is given to sweep(); the clock is the test's."""
import os
import subprocess

import pytest

from tests.ceph.test_volume_driver import cluster  # noqa: F401 - the fixture
from tests.lab import wait_for_own_mount_namespace, wait_until
from volplugin.docker_gc import VolumeGC

pytestmark = pytest.mark.kernel
OPTIONS = {"size": "64M", "fs": "ext4"}


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def test_volumes_no_running_container_mounts_are_released_after_the_grace_only(cluster):
    a = cluster.driver("hostA")
    lost, used, held = cluster.name(), cluster.name(), cluster.name()
    for name in (lost, used, held):
        a.create(name, OPTIONS)
    lost_path = a.mount(lost, "reply-cut")  # Docker never learnt this ID: nothing will unmount it
    used_path = a.mount(used, "c1")  # a running container's
    held_path = a.mount(held, "reply-cut-too")
    # a container Docker does not list, with a copy of that volume's mount only
    holder = subprocess.Popen(["unshare", "--mount", "sh", "-c",
                               f'umount -l "{lost_path}" && umount -l "{used_path}" && exec sleep 300'])
    try:
        wait_for_own_mount_namespace(holder.pid)
        wait_until(lambda: open(f"/proc/{holder.pid}/comm").read().strip() == "sleep", 10, "the holder ready")
        clock = Clock()
        gc = VolumeGC(a, "unix:///nowhere", grace=120, clock=clock)
        assert gc.sweep({used}) == 0  # marked only
        clock.now = 119
        assert gc.sweep({used}) == 0
        clock.now = 120
        assert gc.sweep({used}) == 1
        assert not os.path.ismount(lost_path) and a.state.callers(lost) == [] and a.state.attachment(lost) is None
        assert lost not in a.backends["rbd"].attached(), "detached: another host may mount it now"
        assert a.state.callers(used) == ["c1"], "a running container's volume stays"
        assert os.path.ismount(held_path) and a.state.callers(held) == ["reply-cut-too"], \
            "a process in another mount namespace still has it"
    finally:
        holder.kill()
        holder.wait()

    clock.now = 121
    assert gc.sweep({used}) == 1 and not os.path.ismount(held_path), "the held volume, free now"

    # A Mount after the first pass that found the volume unexplained (a container starting) starts the
    # grace over.
    a.mount(lost, "reply-cut")
    gc.sweep({used})
    clock.now = 200
    a.mount(lost, "starting")
    assert gc.sweep({used}) == 0
    clock.now = 319
    assert gc.sweep({used}) == 0 and a.state.callers(lost) == ["reply-cut", "starting"]
    clock.now = 400
    assert gc.sweep({used, lost}) == 0, "the container runs: Docker lists the volume"
    assert sorted(a.state.callers(lost)) == ["reply-cut", "starting"]

    for name, ids in ((lost, ["reply-cut", "starting"]), (used, ["c1"])):
        for caller in ids:
            a.unmount(name, caller)
    for name in (lost, used, held):
        a.remove(name)

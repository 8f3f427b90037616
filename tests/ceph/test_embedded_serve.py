"""`volplugin serve` with no cluster configured starts a single-node Ceph in its state directory, and
volume data survives restarts of the plugin and of that cluster."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.lab import plugin_post, sh, wait_until
from tests.lab.ceph import destroy_cluster, skip_reason
from volplugin.cephlab import EmbeddedCeph

pytestmark = pytest.mark.kernel


class Served:
    def __init__(self, root: Path):
        self.root, self.socket, self.state = root, root / "vp.sock", root / "state"
        self.proc = None

    def start(self):
        env = dict(os.environ, VOLPLUGIN_RBD_EMBEDDED_STORE_GIB="2", VOLPLUGIN_HOST_ID="solo")
        with open(self.root / "serve.log", "a") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "volplugin", "serve", "--socket", str(self.socket),
                                          "--state-dir", str(self.state)], env=env, stdout=log, stderr=log,
                                         start_new_session=True)
        wait_until(self.socket.exists, 10, "the plugin socket")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)

    def call(self, route, body):
        # The first request waits for start-up (cluster creation) in the listen backlog.
        status, reply = plugin_post(self.socket, route, body, timeout=120)
        assert status == 200, reply
        return reply


@pytest.fixture
def served(tmp_path):
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    s = Served(tmp_path)
    try:
        yield s
    finally:
        s.stop()
        with open("/proc/self/mountinfo") as f:
            for line in f:
                if str(tmp_path) in line.split()[4]:
                    sh(["umount", "-l", line.split()[4]], check=False)
        cluster = EmbeddedCeph(str(s.state / "ceph"))
        for pid_file in (s.state / "rbd").glob("**/*.pid") if (s.state / "rbd").exists() else []:
            pid = int(pid_file.read_text().strip() or 0)
            if pid and Path(f"/proc/{pid}").exists():
                os.kill(pid, signal.SIGKILL)
        destroy_cluster(cluster)


def test_embedded_cluster_keeps_volumes_across_restarts(served):
    served.start()
    served.call("/VolumeDriver.Create", {"Name": "e1", "Opts": {"size": "128M", "fs": "ext4"}})
    mountpoint = served.call("/VolumeDriver.Mount", {"Name": "e1", "ID": "c1"})["Mountpoint"]
    Path(mountpoint, "pgdata", "kept").write_text("yes")
    served.call("/VolumeDriver.Unmount", {"Name": "e1", "ID": "c1"})
    served.stop()
    EmbeddedCeph(str(served.state / "ceph")).stop()  # the cluster too: its store is on disk
    served.start()
    assert [v["Name"] for v in served.call("/VolumeDriver.List", {})["Volumes"]] == ["e1"]
    mountpoint = served.call("/VolumeDriver.Mount", {"Name": "e1", "ID": "c2"})["Mountpoint"]
    assert Path(mountpoint, "pgdata", "kept").read_text() == "yes"
    served.call("/VolumeDriver.Unmount", {"Name": "e1", "ID": "c2"})
    served.call("/VolumeDriver.Remove", {"Name": "e1"})
    assert served.call("/VolumeDriver.List", {})["Volumes"] == []

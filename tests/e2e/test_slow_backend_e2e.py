"""A stalled backend does not stall Docker: every OSD of a private Ceph stopped (SIGSTOP) while `docker run`
waits in volplugin's Mount; meanwhile `docker ps` and a container without that volume go through the same
dockerd at their usual speed, and the stalled run ends within volplugin's timeouts instead of hanging."""
import signal
import subprocess
import time

import pytest

from tests.lab.ceph import daemons_of
from tests.lab.image import IMAGE
from tests.lab.plugin import rbd_volplugin

pytestmark = pytest.mark.e2e
OP_TIMEOUT = 6.0


def test_docker_ps_and_other_containers_go_on_while_a_mount_waits_on_ceph(dockerd, docker, own_ceph, tmp_path):
    plugin = rbd_volplugin(tmp_path, own_ceph, prefix="vpstall", op_timeout=OP_TIMEOUT).start()
    osds = [p for p in daemons_of(own_ceph.conf_path) if "ceph-osd" in open(f"/proc/{p.pid}/cmdline").read()]
    stalled, run = [], None
    try:
        docker("volume", "create", "-d", plugin.name, "-o", "size=128M", "-o", "fs=ext4", "stallvol", timeout=120)
        for osd in osds:
            osd.signal(signal.SIGSTOP)
            stalled.append(osd)
        started = time.monotonic()
        run = subprocess.Popen([*docker_argv(dockerd), "run", "--rm", "--network", "none", "-v", "stallvol:/data",
                                IMAGE, "true"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(1.5)
        assert run.poll() is None, "docker run should be waiting in the stalled Mount"
        asked = time.monotonic()
        docker("ps", "-a", timeout=30)
        ps_seconds = time.monotonic() - asked
        asked = time.monotonic()
        docker("run", "--rm", "--network", "none", IMAGE, "true", timeout=60)
        run_seconds = time.monotonic() - asked
        out, err = run.communicate(timeout=120)
        waited = time.monotonic() - started
        outcome = f"failed: {err.strip()[:200]}" if run.returncode else "went through once Ceph answered"
        print(f"\nwhile a Mount waited on a stalled Ceph: docker ps {ps_seconds:.2f} s, an unrelated docker run "
              f"{run_seconds:.2f} s; the stalled run ended after {waited:.1f} s and {outcome}")
        assert ps_seconds < 2.0 and run_seconds < 10.0
        # it ends either way, within the plugin's timeouts: with volplugin's error, or done by a retry
        assert run.returncode == 0 or "did not answer within" in err, err
        assert waited < OP_TIMEOUT * 3 + 15
    finally:
        for osd in stalled:
            osd.signal(signal.SIGCONT)
        if run is not None and run.poll() is None:
            run.kill()
            run.wait(30)
        dockerd.remove_all_containers(timeout=60)
        docker("volume", "rm", "-f", "stallvol", check=False, timeout=120)
        plugin.destroy()


def docker_argv(dockerd) -> list[str]:
    return ["/usr/bin/docker", "-H", dockerd.host]

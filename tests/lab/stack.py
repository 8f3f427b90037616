"""A dockerd and a netplugin instance side by side in one netns, torn down together: the stack the
VM lane's end-to-end tests share (timeouts sized for software emulation)."""
from __future__ import annotations

import contextlib
import sys
import time

from .dockerd import Dockerd
from .image import IMAGE, build_busybox_tar
from .plugin import Plugin

# Under TCG dockerd starts in ~16 s and `docker run` takes 8-14 s.
DOCKERD_START_TIMEOUT = 180
PLUGIN_START_TIMEOUT = 120
DOCKER_TIMEOUT = 180


@contextlib.contextmanager
def docker_stack(netns: str | None, tmp_path_factory, label: str):
    """Yields (dockerd, plugin) with the busybox image imported; on the way out removes the containers
    and the plugin's networks while the plugin still answers, then stops both. A failure prints the
    tails of both logs."""
    started = time.monotonic()
    tar = build_busybox_tar(tmp_path_factory.mktemp("image") / "busybox.tar")
    daemon = Dockerd(netns, log_path=tmp_path_factory.mktemp("dockerd") / "dockerd.log")
    plugin = Plugin(netns, tmp_path_factory.mktemp("plugin"), docker_host=daemon.host)
    try:
        plugin.start(timeout=PLUGIN_START_TIMEOUT)
        daemon.start(timeout=DOCKERD_START_TIMEOUT)
        daemon.import_image(tar, IMAGE)
        print(f"{label}: dockerd, plugin and image ready: {time.monotonic() - started:.1f} s", file=sys.stderr)
        yield daemon, plugin
        daemon.remove_all_containers(timeout=DOCKER_TIMEOUT)
        daemon.remove_networks(driver=plugin.name, timeout=DOCKER_TIMEOUT)
    except BaseException:
        print(f"--- dockerd log ---\n{daemon.log_tail(30)}\n--- plugin log ---\n{plugin.log_tail(40)}",
              file=sys.stderr)
        raise
    finally:
        try:
            plugin.destroy()
        finally:
            daemon.destroy()

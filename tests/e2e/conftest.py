"""Fixtures for end-to-end tests through a real dockerd on an emulated physical network.

    physnet   (module)   Physnet: netns sw (bridge br0), router 10.77.0.1, hostb 10.77.0.50,
                         hosta = the Docker host with parents eth1, eth2 (no IP) on the switch
    dockerd   (module)   Dockerd in physnet.hosta, test image imported (IMAGE)
    docker    (function) dockerd.docker: docker("run", ..., check=True) -> CompletedProcess
    plugin    (function) Plugin: netplugin serving /run/docker/plugins/<unique>.sock in hosta
    lab       (function) an empty Lab for tests that build their own namespaces
    busybox_tar (session) the image tar, built once

Between tests (autouse) the module's dockerd is reset (no containers, no user networks; a fresh
daemon if that fails) and hosta's links are restored. A failing test's report gets the tails of
the plugin and dockerd logs.
"""
from __future__ import annotations

import sys
import time

import pytest

from tests.lab import LAB_PREFIX, REPO_ROOT, cleanup_all, sigterm_unwinds, skip_reason
from tests.lab.dockerd import Dockerd
from tests.lab.image import IMAGE, build_busybox_tar
from tests.lab.netns import Lab, build_physnet, list_netns, stale_netns
from tests.lab.pgimage import POSTGRES_IMAGE, build_postgres_tar, import_postgres
from tests.lab.pgimage import skip_reason as pg_skip_reason
from tests.lab.plugin import Plugin, rbd_volplugin
from tests.lab.rbd import end_attachments_under

SKIP_REASON = skip_reason()


def pytest_collection_modifyitems(config, items):
    if SKIP_REASON is None:
        return
    skip = pytest.mark.skip(reason=f"e2e lab unavailable: {SKIP_REASON}")
    for item in items:
        if item.get_closest_marker("e2e"):
            item.add_marker(skip)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    """Keep each phase's report on the item (item.rep_setup/rep_call/rep_teardown) and append
    the plugin and dockerd log tails to a failed test's report."""
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)
    if rep.failed and rep.when in ("setup", "call"):
        funcargs = getattr(item, "funcargs", {})
        for name in ("plugin", "dockerd"):
            obj = funcargs.get(name)
            if obj is not None and hasattr(obj, "log_tail"):
                rep.sections.append((f"{name} log (tail, {obj.log})", obj.log_tail()))
    return rep


def _require_lab():
    if SKIP_REASON is not None:
        pytest.skip(f"e2e lab unavailable: {SKIP_REASON}")




@pytest.fixture(scope="session", autouse=True)
def _lab_session_guard():
    """Warn about namespaces left by a killed earlier run; at session end tear down anything
    still owned by this run and complain about leaks."""
    stale = stale_netns()
    if stale:
        print(f"\nLAB: netns left by dead test runs (remove by hand): {stale}", file=sys.stderr)
    with sigterm_unwinds():
        yield
    errors = cleanup_all()
    left = list_netns(LAB_PREFIX)
    if errors or left:
        print(f"\nLAB LEAK at session end: errors={errors} netns={left}", file=sys.stderr)


@pytest.fixture(scope="session")
def busybox_tar(tmp_path_factory):
    _require_lab()
    return build_busybox_tar(tmp_path_factory.mktemp("image") / "busybox.tar")


@pytest.fixture
def lab():
    """An empty Lab; every netns made through it is removed after the test."""
    _require_lab()
    the_lab = Lab()
    try:
        yield the_lab
    finally:
        the_lab.destroy()


@pytest.fixture(scope="module")
def physnet():
    _require_lab()
    the_lab = Lab()
    try:
        yield build_physnet(the_lab)
    finally:
        the_lab.destroy()


@pytest.fixture(scope="module")
def dockerd(physnet, busybox_tar, tmp_path_factory):
    log = tmp_path_factory.mktemp("dockerd") / "dockerd.log"
    daemon = Dockerd(physnet.hosta, log_path=log)
    try:
        daemon.start()
        daemon.import_image(busybox_tar, IMAGE)
        yield daemon
    finally:
        daemon.destroy()


@pytest.fixture(autouse=True)
def _lab_hygiene(request):
    """After each test using them: reset the module's dockerd, restore hosta's links."""
    names = request.fixturenames
    daemon = request.getfixturevalue("dockerd") if "dockerd" in names else None
    net = request.getfixturevalue("physnet") if "physnet" in names else None
    yield
    try:
        if daemon is not None:
            daemon.reset()
    finally:
        if net is not None:
            net.restore_hosta()


@pytest.fixture
def docker(dockerd):
    """``docker(*args, check=True, timeout=60, input=None)`` against the test dockerd."""
    return dockerd.docker


@pytest.fixture
def plugin(dockerd, tmp_path):
    """netplugin in dockerd's netns with a fresh state dir and a unique driver name."""
    if not (REPO_ROOT / "netplugin" / "__main__.py").exists():
        pytest.skip("netplugin/__main__.py does not exist yet")
    p = Plugin(dockerd.netns, tmp_path / "plugin", docker_host=dockerd.host)
    try:
        p.start()
        yield p
        _release_plugin_networks(dockerd, p)
    finally:
        p.destroy()


def _release_plugin_networks(dockerd: Dockerd, p: Plugin) -> None:
    """Let docker tear down what uses the plugin while the plugin still answers; if it can't,
    the daemon is marked dirty and the hygiene fixture replaces it."""
    try:
        if not dockerd.alive():
            dockerd.start()
        if not p.alive():
            p.start()
        dockerd.remove_all_containers(timeout=30)
        dockerd.remove_networks(driver=p.name, timeout=30)
    except Exception as exc:  # noqa: BLE001 - teardown must go on
        print(f"plugin teardown: docker cleanup failed, dockerd will be recreated: {exc}",
              file=sys.stderr)
        dockerd.dirty = True


@pytest.fixture(scope="session")
def postgres_tar(tmp_path_factory):
    reason = pg_skip_reason()
    if reason:
        pytest.skip(f"postgres image unavailable: {reason}")
    start = time.monotonic()
    tar = build_postgres_tar(tmp_path_factory.mktemp("pgimage") / "postgres.tar")
    took = time.monotonic() - start
    print(f"\npgimage: built {tar} ({tar.stat().st_size / 1e6:.1f} MB) in {took:.2f}s",
          file=sys.stderr)
    yield tar
    tar.unlink(missing_ok=True)  # 80 MB: don't leave one in each of pytest's kept basetemps


@pytest.fixture
def pg_image(dockerd, postgres_tar):
    start = time.monotonic()
    import_postgres(dockerd, postgres_tar)
    print(f"\npgimage: import {time.monotonic() - start:.2f}s", file=sys.stderr)
    return POSTGRES_IMAGE


@pytest.fixture
def volplugin(dockerd, ceph, tmp_path):
    """volplugin serving a unique driver name on the shared test Ceph cluster, as host "hostA"."""
    p = rbd_volplugin(tmp_path, ceph)
    try:
        p.start()
        yield p
        dockerd.remove_all_containers(timeout=60)
        for volume in dockerd.docker("volume", "ls", "-q", "--filter", f"driver={p.name}").stdout.split():
            dockerd.docker("volume", "rm", volume, check=False)
    finally:
        p.destroy()
        # what a failed run left attached (rbd-fuse outlives the plugin's kills): a mount left here
        # outlives the session, and its loop device is scanned by every lvm command on the host
        end_attachments_under(p.workdir)

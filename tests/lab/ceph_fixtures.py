"""Fixtures for tests against a real single-node Ceph cluster (volplugin.cephlab.EmbeddedCeph).

    ceph      (session)  the shared running cluster; tests must leave it running and must not
                         depend on what other tests wrote to it (use unique image names)
    own_ceph  (function) a small private cluster, for tests that stop or kill daemons
    new_ceph  (function) a small private cluster not created yet (ensure_running() creates it)

Skipped with a reason when not root or Ceph is not installed (bash scripts/setup installs it).
"""
from __future__ import annotations

import sys

import pytest

from tests.lab import sigterm_unwinds
from tests.lab.ceph import destroy_cluster, skip_reason, stale_clusters, throwaway_cluster

SKIP_REASON = skip_reason()


def _require_ceph():
    if SKIP_REASON is not None:
        pytest.skip(f"embedded Ceph unavailable: {SKIP_REASON}")




@pytest.fixture(scope="session")
def _ceph_session_guard():
    """Name daemons a killed earlier run left behind; make a CI timeout's SIGTERM unwind through
    the fixtures (and so stop the clusters) instead of killing pytest outright."""
    stale = stale_clusters()
    if stale:
        print(f"\nCEPH LAB: daemons of dead test runs (tests.lab.ceph.stop_stale_clusters() ends "
              f"them): {sorted(stale)}", file=sys.stderr)
    with sigterm_unwinds():
        yield


@pytest.fixture(scope="session")
def ceph(_ceph_session_guard, tmp_path_factory):
    _require_ceph()
    cluster = throwaway_cluster(tmp_path_factory.mktemp("ceph"))
    yield cluster
    destroy_cluster(cluster)


@pytest.fixture
def own_ceph(_ceph_session_guard, tmp_path):
    _require_ceph()
    cluster = throwaway_cluster(tmp_path, store_gib=2)
    yield cluster
    destroy_cluster(cluster)


@pytest.fixture
def new_ceph(_ceph_session_guard, tmp_path):
    _require_ceph()
    cluster = throwaway_cluster(tmp_path, start=False, store_gib=2)
    yield cluster
    destroy_cluster(cluster)

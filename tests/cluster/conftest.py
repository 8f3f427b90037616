"""Tests against a real etcd (Debian's etcd-server), one per session on the loopback, and a fresh key
prefix per test, so tests never see each other's keys."""
from __future__ import annotations

import uuid

import pytest

from tests.lab.etcd import EtcdServer, skip_reason


@pytest.fixture(scope="session")
def etcd_server(tmp_path_factory):
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    server = EtcdServer(tmp_path_factory.mktemp("etcd"))
    server.start()
    yield server
    server.destroy()


@pytest.fixture
def etcd_url(etcd_server) -> str:
    if not etcd_server.alive():
        etcd_server.start()  # a test that killed it
    etcd_server.resume()  # a test that paused it
    return etcd_server.url


@pytest.fixture
def prefix() -> str:
    return f"/t-{uuid.uuid4().hex[:10]}/"


@pytest.fixture
def etcd(etcd_url, prefix):
    from netplugin.cluster.etcd import Etcd
    return Etcd(etcd_url, prefix, timeout=2.0)

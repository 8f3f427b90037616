"""The volume protocol through Flask's test client: routes, error format, validation before any backend
call, unknown IDs released without error. Real backends are exercised in tests/ceph."""
import json

import pytest

from volplugin import config as volconfig
from volplugin.backends.base import Backend, LocalOnlyCatalog
from volplugin.service import Services, create_app

ROUTES = ["Create", "Remove", "Mount", "Unmount", "Path", "Get", "List", "Capabilities"]


class UntouchableBackend(Backend):
    """Stands in where a request must be refused before any storage is touched."""

    name = "rbd"

    def __getattribute__(self, item):
        if item in ("name", "__class__"):
            return object.__getattribute__(self, item)
        raise AssertionError(f"backend.{item} must not be reached")


@pytest.fixture
def client(tmp_path):
    config = volconfig.load(overrides={"state_dir": str(tmp_path)}, environ={})
    services = Services(config, backends={"rbd": UntouchableBackend()}, catalog=LocalOnlyCatalog())
    return create_app(config, services).test_client()


def post(client, route, body=None, raw=None):
    response = client.post(route, data=raw if raw is not None else ("" if body is None else json.dumps(body)))
    assert response.content_type == "application/vnd.docker.plugins.v1.2+json"
    return response.status_code, json.loads(response.data)


def test_activate_and_capabilities(client):
    assert post(client, "/Plugin.Activate")[1] == {"Implements": ["VolumeDriver"]}
    # a host-local catalog (as with only LVM configured): Docker must not expect the volume elsewhere
    assert post(client, "/VolumeDriver.Capabilities", {})[1] == {"Capabilities": {"Scope": "local"}}


def test_scope_is_global_with_a_shared_catalog(tmp_path):
    class SharedCatalog(LocalOnlyCatalog):
        shared = True

    config = volconfig.load(overrides={"state_dir": str(tmp_path)}, environ={})
    services = Services(config, backends={"rbd": UntouchableBackend()}, catalog=SharedCatalog())
    client = create_app(config, services).test_client()
    assert post(client, "/VolumeDriver.Capabilities", {})[1] == {"Capabilities": {"Scope": "global"}}


@pytest.mark.parametrize("route", [f"/VolumeDriver.{r}" for r in ROUTES])
def test_every_route_tolerates_bad_bodies(client, route):
    for raw in ("", "garbage", "[]", "null"):
        status, body = post(client, route, raw=raw)
        assert status != 404
        if status != 200:
            assert body["Err"], "an error must never be empty"


@pytest.mark.parametrize("name, opts, message", [
    ("../etc", {}, "is invalid"),
    ("a/b", {}, "is invalid"),
    ("", {}, "Name is required"),
    ("x" * 101, {}, "is invalid"),
    ("pg1", {"colour": "red"}, "unknown option colour"),
    ("pg1", {"size": "lots"}, "is not a size"),
    ("pg1", {"size": "1K"}, "outside 64M..64T"),
    ("pg1", {"size": "100M"}, "too small for xfs"),
    ("pg1", {"fs": "btrfs"}, "not supported"),
    ("pg1", {"uid": "-1"}, "not a numeric id"),
    ("pg1", {"from": "nosnap"}, "expected <volume>@<snapshot>"),
    ("pg1", {"backend": "floppy"}, "backend 'floppy' is not available"),
])
def test_bad_create_is_refused_before_any_backend_call(client, name, opts, message):
    status, body = post(client, "/VolumeDriver.Create", {"Name": name, "Opts": opts})
    assert status >= 400 and message in body["Err"]
    assert post(client, "/VolumeDriver.List", {})[1] == {"Volumes": [], "Err": ""}


def test_unknown_volume_and_caller(client):
    assert post(client, "/VolumeDriver.Unmount", {"Name": "pg1", "ID": "abc"}) == (200, {"Err": ""})
    assert post(client, "/VolumeDriver.Remove", {"Name": "pg1"}) == (200, {"Err": ""})
    status, body = post(client, "/VolumeDriver.Get", {"Name": "pg1"})
    assert status == 404 and "does not exist" in body["Err"]
    status, body = post(client, "/VolumeDriver.Mount", {"Name": "pg1", "ID": "abc"})
    assert status == 404 and "does not exist" in body["Err"]

"""Metrics and request logs through Flask's test client and the real state stores; the served,
multi-worker path (multiprocess files, the elected exporter, a real scrape) is
tests/kernel/test_metrics_served.py."""
import io
import json
import logging
import socket

import pytest
from prometheus_client import CollectorRegistry

from netplugin import config as netconfig
from netplugin.metrics import StateCollector as NetCollector
from netplugin.service import Services as NetServices, create_app as net_app
from plugincore import logs, metrics
from plugincore.errors import InvalidRequest, PluginError
from volplugin import config as volconfig
from volplugin import metrics as volmetrics
from volplugin.backends.base import Backend, LocalOnlyCatalog
from volplugin.service import Services as VolServices
from volplugin.state import READY

NID, EID = "0123456789ab" + "cd" * 26, "fedcba987654" + "ef" * 26
POOL = "local/10.61.0.0/24"


@pytest.fixture
def registry():
    registry = CollectorRegistry()
    metrics.enable("netplugin", registry)
    yield registry
    metrics.disable()


@pytest.fixture
def services(tmp_path):
    return NetServices(netconfig.load(overrides={"state_dir": str(tmp_path)}, environ={}))


@pytest.fixture
def client(tmp_path, services):
    return net_app(None, services).test_client()


def post(client, route, body=None):
    return client.post(route, data="" if body is None else json.dumps(body))


def sample(registry, name, **labels):
    return registry.get_sample_value(name, labels) or 0


def test_requests_latency_and_errors_are_counted(registry, client):
    assert post(client, "/IpamDriver.RequestPool", {"Pool": "10.61.0.0/24"}).status_code == 200
    for wanted in ("10.61.0.5", "10.61.0.6", "10.61.0.5"):  # the third is in use: a Conflict
        post(client, "/IpamDriver.RequestAddress", {"PoolID": POOL, "Address": wanted})
    post(client, "/NetworkDriver.NoSuchThing", {})
    route = "/IpamDriver.RequestAddress"
    assert sample(registry, "netplugin_requests_total", endpoint=route, code="2xx") == 2
    assert sample(registry, "netplugin_requests_total", endpoint=route, code="4xx") == 1
    assert sample(registry, "netplugin_request_duration_seconds_count", endpoint=route) == 3
    assert sample(registry, "netplugin_request_duration_seconds_sum", endpoint=route) > 0
    assert sample(registry, "netplugin_errors_total", endpoint=route, type="Conflict") == 1
    # An unknown path is one "unknown" series, never a series per path a caller makes up.
    assert sample(registry, "netplugin_requests_total", endpoint="unknown", code="4xx") == 1
    assert sample(registry, "netplugin_errors_total", endpoint="unknown", type="HTTP404") == 1


def test_nothing_is_counted_with_metrics_off(client):
    metrics.disable()
    assert post(client, "/Plugin.Activate").status_code == 200  # and no error from the hooks


def test_network_state_gauges(registry, client, services):
    registry.register(NetCollector(services.driver, services.ipam))
    post(client, "/IpamDriver.RequestPool", {"Pool": "10.61.0.0/24"})
    for _ in range(3):
        post(client, "/IpamDriver.RequestAddress", {"PoolID": POOL})
    assert sample(registry, "netplugin_ipam_addresses_in_use", pool=POOL) == 3
    assert sample(registry, "netplugin_ipam_pools") == 1
    post(client, "/IpamDriver.ReleaseAddress", {"PoolID": POOL, "Address": "10.61.0.1"})
    assert sample(registry, "netplugin_ipam_addresses_in_use", pool=POOL) == 2
    # Every mode is reported, with 0 networks: a dashboard needs no special case for "none yet".
    for mode in ("static", "vlan", "sriov", "overlay"):
        assert registry.get_sample_value("netplugin_networks", {"mode": mode}) == 0
    assert registry.get_sample_value("netplugin_endpoints") == 0
    assert registry.get_sample_value("netplugin_shaped_endpoints", {"direction": "egress"}) == 0


class NoStorage(Backend):
    """The gauges read state only: any backend call would be a scrape touching storage."""

    name = "rbd"

    def __getattribute__(self, item):
        if item in ("name", "__class__"):
            return object.__getattribute__(self, item)
        raise AssertionError(f"backend.{item} must not be reached by a scrape")


def test_volume_gauges_and_events(tmp_path):
    registry = CollectorRegistry()
    metrics.enable("volplugin", registry)
    try:
        config = volconfig.load(overrides={"state_dir": str(tmp_path)}, environ={})
        driver = VolServices(config, backends={"rbd": NoStorage()}, catalog=LocalOnlyCatalog()).driver
        registry.register(volmetrics.StateCollector(driver))
        for name in ("pg1", "pg2"):
            driver.state.put_volume(name, {"backend": "rbd"}, {}, READY)
        driver.state.put_volume("half", {"backend": "rbd"}, {}, "creating")
        driver.state.record_mount("pg1", "c" * 64, "/dev/rbd0", str(tmp_path / "m"))
        driver.state.add_caller("pg1", "d" * 64)
        assert sample(registry, "volplugin_volumes", backend="rbd") == 2
        assert sample(registry, "volplugin_mounted_volumes", backend="rbd") == 1
        assert sample(registry, "volplugin_mount_callers") == 2
        with volmetrics.attach_timer("rbd"):
            pass
        with pytest.raises(RuntimeError), volmetrics.detach_timer("rbd"):
            raise RuntimeError("a failed detach is the request's error, not a latency sample")
        volmetrics.lock_takeover()
        assert sample(registry, "volplugin_attach_duration_seconds_count", backend="rbd") == 1
        assert sample(registry, "volplugin_detach_duration_seconds_count", backend="rbd") == 0
        assert sample(registry, "volplugin_lock_takeovers_total") == 1
    finally:
        metrics.disable()


def test_request_log_line_has_ids_outcome_and_duration(client, caplog):
    caplog.set_level(logging.INFO, logger="plugincore.app")
    post(client, "/NetworkDriver.CreateEndpoint", {"NetworkID": NID, "EndpointID": EID, "Interface": {}})
    post(client, "/IpamDriver.RequestPool", {"Pool": "10.61.0.0/24"})
    post(client, "/IpamDriver.RequestPool", {"Pool": "10.61.0.0/16"})  # overlaps: Conflict
    lines = [r for r in caplog.records if r.name == "plugincore.app"]
    assert len(lines) == 3, "one line per request, the error included"
    first = lines[0].getMessage()
    assert first.startswith("POST /NetworkDriver.CreateEndpoint 404 ") and "ms " in first
    assert f"NetworkID={NID[:12]} EndpointID={EID[:12]}" in first and NID[:13] not in first
    assert 'error="network' in first and lines[0].levelno == logging.INFO  # Get-style 404: routine
    second = lines[1].getMessage()
    assert second.startswith("POST /IpamDriver.RequestPool 200 ") and second.endswith("ms Pool=10.61.0.0/24")
    assert lines[2].levelno == logging.WARNING and "overlaps pool 10.61.0.0/24" in lines[2].getMessage()
    assert lines[2].fields["status"] == 409 and lines[2].fields["duration_ms"] >= 0


def test_request_log_values_cannot_break_the_line(client, caplog):
    caplog.set_level(logging.INFO, logger="plugincore.app")
    post(client, "/VolumeDriver.Get", {"Name": "x\ninjected=1 " + "y" * 100})
    line = caplog.records[-1].getMessage()
    assert "\n" not in line and 'Name="x\\ninjected=1 yyy' in line and "..." in line


def test_json_log_lines(client):
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.formatter("json"))
    app_log = logging.getLogger("plugincore.app")
    app_log.addHandler(handler)
    old_level, app_log.level = app_log.level, logging.INFO
    try:
        post(client, "/NetworkDriver.Leave", {"NetworkID": NID, "EndpointID": EID})
        app_log.warning("plain %s", "record", exc_info=ValueError("boom"))
    finally:
        app_log.removeHandler(handler)
        app_log.setLevel(old_level)
    request, plain = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert {"time", "level", "logger", "pid", "message"} <= set(request)
    assert request["time"].endswith("Z") and request["level"] == "INFO" and request["logger"] == "plugincore.app"
    assert request["endpoint"] == "/NetworkDriver.Leave" and request["status"] == 200
    assert request["NetworkID"] == NID[:12] and request["EndpointID"] == EID[:12]
    assert isinstance(request["duration_ms"], float) and "error" not in request
    assert plain["message"] == "plain record" and "ValueError: boom" in plain["exception"]


@pytest.mark.parametrize("value", ["9464", "localhost", "127.0.0.1:0", "127.0.0.1:70000", "host:port",
                                   "[::1]9464", "unix:/run/x.sock", "http://127.0.0.1:9464", ":9464"])
def test_bad_metrics_address_is_refused_at_load(value):
    with pytest.raises(InvalidRequest, match="metrics_address"):
        netconfig.load(environ={"NETPLUGIN_METRICS_ADDRESS": value})
    with pytest.raises(InvalidRequest, match="metrics_address"):
        volconfig.load(environ={"VOLPLUGIN_METRICS_ADDRESS": value})


def test_metrics_address_and_log_format_settings():
    assert metrics.parse_address("") is None
    assert metrics.parse_address("127.0.0.1:9464") == ("127.0.0.1", 9464)
    assert metrics.parse_address("[::1]:9464") == ("::1", 9464)
    assert metrics.parse_address("metrics.example:80") == ("metrics.example", 80)
    assert netconfig.load(environ={"NETPLUGIN_LOG_FORMAT": "json"})["log_format"] == "json"
    with pytest.raises(InvalidRequest, match="log_format 'xml'"):
        volconfig.load(environ={"VOLPLUGIN_LOG_FORMAT": "xml"})


def test_a_taken_metrics_port_stops_the_start(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        exporter = metrics.Exporter(f"127.0.0.1:{port}", str(tmp_path / "metrics"), "netplugin")
        with pytest.raises(PluginError, match=f"127.0.0.1:{port}: cannot listen"):
            exporter.prepare()
    assert not (tmp_path / "metrics").exists(), "nothing touched before the check"

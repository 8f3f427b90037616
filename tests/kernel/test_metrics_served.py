"""Metrics of a really served netplugin: gunicorn workers as processes, prometheus_client's multiprocess
files, the elected exporter, a scrape over HTTP. Only IPAM calls (no kernel change), but the plugin
still runs in a throwaway netns: start-up reconciliation owns the netns it runs in."""
import http.client
import json
import os
import signal
import socket
from concurrent.futures import ThreadPoolExecutor

from prometheus_client.parser import text_string_to_metric_families

from tests.lab import wait_until
from tests.lab.plugin import Plugin

POOL = "local/10.62.0.0/22"
ROUTE = "/IpamDriver.RequestAddress"


def _free_port() -> int:
    # The test thread is in the lab's netns (conftest.py), where the plugin listens too.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scrape(port: int) -> dict | None:
    """{(name, labels...): value} of every sample, or None while nothing answers (http.client: no proxy)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        text = response.read().decode()
    except OSError:
        return None
    finally:
        conn.close()
    assert response.status == 200, text
    return {(s.name, *sorted(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _log_records(plugin: Plugin) -> list[dict]:
    lines = plugin.log.read_text().splitlines()
    records = [json.loads(line) for line in lines if line.startswith("{")]
    # log_format = "json": every line the plugin wrote is one (gunicorn's own included).
    assert len(records) == len([ln for ln in lines if ln and not ln.startswith("=== lab:")])
    return records


def _serving_pids(plugin: Plugin) -> set[int]:
    return {r["pid"] for r in _log_records(plugin) if r.get("endpoint") == ROUTE and r.get("status") == 200}


def test_metrics_summed_across_workers_and_state_gauge(lab, tmp_path):
    port = _free_port()
    config = tmp_path / "netplugin.toml"
    # Sync workers (one request at a time each): concurrent requests must spread over the workers.
    config.write_text(f'workers = 3\nthreads = 1\nlog_format = "json"\nmetrics_address = "127.0.0.1:{port}"\n')
    plugin = Plugin(lab.host, tmp_path / "plugin", extra_args=("--config", str(config)))
    plugin.start()
    try:
        assert plugin.call("/IpamDriver.RequestPool", {"Pool": "10.62.0.0/22"})["PoolID"] == POOL
        posted = 0
        with ThreadPoolExecutor(8) as pool:
            while len(_serving_pids(plugin)) < 2 and posted < 200:
                replies = list(pool.map(lambda _: plugin.request(ROUTE, {"PoolID": POOL}), range(16)))
                assert all(status == 200 for status, _ in replies), replies
                posted += len(replies)
        assert len(_serving_pids(plugin)) >= 2, "the requests never reached a second worker"

        def settled():
            samples = _scrape(port)
            return samples if samples and samples.get(
                ("netplugin_requests_total", ("code", "2xx"), ("endpoint", ROUTE))) == posted else None

        samples = wait_until(settled, 10, f"/metrics to count {posted} requests")
        assert samples[("netplugin_request_duration_seconds_count", ("endpoint", ROUTE))] == posted
        assert samples[("netplugin_ipam_addresses_in_use", ("pool", POOL))] == posted
        assert samples[("netplugin_networks", ("mode", "static"))] == 0

        # The exporting worker dies: another takes over, and the dead worker's counts still count.
        exporter = [r["pid"] for r in _log_records(plugin) if r["message"].startswith("metrics exporter running")]
        assert len(exporter) == 1
        os.kill(exporter[0], signal.SIGKILL)
        assert plugin.request(ROUTE, {"PoolID": POOL})[0] == 200
        posted += 1
        wait_until(lambda: len([r for r in _log_records(plugin)
                                if r["message"].startswith("metrics exporter running")]) == 2,
                   15, "another worker to take over the exporter")
        samples = wait_until(settled, 10, f"/metrics to count {posted} requests after a worker died")
        assert samples[("netplugin_ipam_addresses_in_use", ("pool", POOL))] == posted
        line = next(r for r in _log_records(plugin) if r.get("endpoint") == ROUTE)
        assert line["PoolID"] == POOL and line["level"] == "INFO" and line["duration_ms"] >= 0
    finally:
        plugin.destroy()

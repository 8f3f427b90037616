"""Prometheus metrics of both plugins: requests per protocol endpoint, errors, service events, and the
exporter serving /metrics on ``metrics_address``.

gunicorn workers are separate processes, so counters and histograms use prometheus_client's
multiprocess mode: each worker writes its own files under ``<state_dir>/metrics`` (wiped when the master
starts), and ONE worker, elected by lock like the other background work, serves their sum together
with gauges its service computes from its state at scrape time (``collectors``: no per-process gauges).
With metrics off (``metrics_address = ""``) prometheus_client is never imported and every hook here is a
no-op.
"""
import contextlib
import logging
import os
import re
import shutil
import socket
import threading
import time

from .background import start_elected
from .errors import InvalidRequest, PluginError

log = logging.getLogger("plugincore.metrics")
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Docker waits up to 120 s for a plugin call: the top buckets must still tell slow from hung.
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
SLOW_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120)
_ADDRESS = re.compile(r"^(?:\[(?P<v6>[0-9a-fA-F:.]+)\]|(?P<host>[A-Za-z0-9.-]+)):(?P<port>[0-9]{1,5})$")

_lock = threading.Lock()
_events = None  # _Events once enable() ran in this process


def parse_address(value: str) -> tuple[str, int] | None:
    """``metrics_address``: "" (off) -> None, "HOST:PORT" or "[V6]:PORT" -> (host, port)."""
    if value == "":
        return None
    match = _ADDRESS.match(value) if isinstance(value, str) else None
    port = int(match["port"]) if match else 0
    if not 1 <= port <= 65535:
        raise InvalidRequest(f"metrics_address {value!r}: expected HOST:PORT (127.0.0.1:9464, [::1]:9464) "
                             "or \"\" to switch metrics off")
    return match["v6"] or match["host"], port


class _Events:
    """This process's counters and histograms; the service-specific ones are made on first use."""

    def __init__(self, namespace: str, registry):
        from prometheus_client import Counter, Histogram

        self.namespace, self.registry = namespace, registry
        self.requests = Counter(f"{namespace}_requests", "Plugin API requests by endpoint and status class",
                                ["endpoint", "code"], registry=registry)
        self.latency = Histogram(f"{namespace}_request_duration_seconds", "Plugin API request duration",
                                 ["endpoint"], buckets=REQUEST_BUCKETS, registry=registry)
        self.errors = Counter(f"{namespace}_errors", "Failed plugin API requests by endpoint and error type",
                              ["endpoint", "type"], registry=registry)
        self.extra: dict = {}

    def metric(self, kind: str, name: str, doc: str, labels, **options):
        with _lock:
            found = self.extra.get(name)
            if found is None:
                import prometheus_client

                found = self.extra[name] = getattr(prometheus_client, kind)(
                    f"{self.namespace}_{name}", doc, list(labels), registry=self.registry, **options)
        return found.labels(**labels) if labels else found


def enable(namespace: str, registry=None) -> None:
    """Count in this process from now on. ``registry`` None: unregistered metrics, which is right in
    multiprocess mode (the exporter reads the files); tests pass a CollectorRegistry to read back."""
    global _events
    _events = _Events(namespace, registry)


def disable() -> None:
    global _events
    _events = None


def observe_request(endpoint: str, status: int, seconds: float, error_type: str | None = None) -> None:
    if _events is None:
        return
    _events.requests.labels(endpoint=endpoint, code=f"{status // 100}xx").inc()
    _events.latency.labels(endpoint=endpoint).observe(seconds)
    if error_type:
        _events.errors.labels(endpoint=endpoint, type=error_type).inc()


def count(name: str, doc: str, **labels) -> None:
    """Add one to the counter ``<namespace>_<name>_total`` (made on first use)."""
    if _events is not None:
        _events.metric("Counter", name, doc, labels).inc()


def observe(name: str, doc: str, seconds: float, **labels) -> None:
    """Record a duration in the histogram ``<namespace>_<name>`` (made on first use)."""
    if _events is not None:
        _events.metric("Histogram", name, doc, labels, buckets=SLOW_BUCKETS).observe(seconds)


@contextlib.contextmanager
def timed(name: str, doc: str, **labels):
    """Observe how long the block took, if it succeeded (a failure is counted as the request's error)."""
    started = time.monotonic()
    yield
    observe(name, doc, time.monotonic() - started, **labels)


class Exporter:
    """Multiprocess metrics of one served plugin. ``prepare`` runs in the gunicorn master before any
    worker forks, ``start`` in every worker, ``child_exit`` in the master when a worker exits.
    ``collectors(app)`` returns the service's scrape-time collectors for the worker's Flask app."""

    def __init__(self, address: str, directory: str, namespace: str, collectors=lambda app: []):
        self.host, self.port = parse_address(address)
        self.address, self.directory, self.namespace, self.collectors = address, directory, namespace, collectors

    def prepare(self) -> None:
        try:  # only a check: a taken port stops the start with a clear error, not a log line per retry
            socket.create_server((self.host, self.port),
                                 family=socket.AF_INET6 if ":" in self.host else socket.AF_INET).close()
        except OSError as exc:
            raise PluginError(f"metrics_address {self.address}: cannot listen: {exc.strerror or exc}") from None
        # The counters of a previous run would otherwise be added to this run's.
        shutil.rmtree(self.directory, ignore_errors=True)
        os.makedirs(os.path.dirname(self.directory), mode=0o700, exist_ok=True)
        os.makedirs(self.directory, mode=0o700)
        os.environ[MULTIPROC_ENV] = self.directory
        # prometheus_client picks its value class when first imported: make sure it sees the directory.
        from prometheus_client import values
        values.ValueClass = values.get_value_class()

    def child_exit(self, pid: int) -> None:
        from prometheus_client import multiprocess
        multiprocess.mark_process_dead(pid, self.directory)

    def start(self, app) -> None:
        enable(self.namespace)
        start_elected("metrics exporter", os.path.join(self.directory, "exporter.lock"),
                      lambda stop: self._serve(app, stop))

    def _serve(self, app, stop: threading.Event) -> None:
        from prometheus_client import CollectorRegistry, start_http_server
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry, self.directory)
        for collector in self.collectors(app):
            registry.register(collector)
        server, _thread = start_http_server(self.port, self.host, registry)
        log.info("metrics on http://%s/metrics", self.address)
        try:
            stop.wait()
        finally:
            server.shutdown()
            server.server_close()


def exporter_for(config: dict, namespace: str, collectors) -> Exporter | None:
    """The exporter a service's configuration asks for, or None with metrics off."""
    if not config["metrics_address"]:
        return None
    return Exporter(config["metrics_address"], os.path.join(config["state_dir"], "metrics"), namespace,
                    collectors)

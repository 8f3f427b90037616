"""volplugin's metrics: gauges computed from this host's state when Prometheus scrapes, and the
attach/detach timings and lock takeovers the driver and the RBD backend report (plugincore/metrics.py).

Gauges come from local state only (no cluster call at scrape time: a slow Ceph must not hang the
scrape): the volumes this host knows, not every volume in the cluster's catalog.
"""
import logging

from plugincore import metrics
from .state import READY

log = logging.getLogger("volplugin.metrics")


def attach_timer(backend: str):
    """Around a first Mount on this host: attach + mount (+ PGDATA check)."""
    return metrics.timed("attach_duration_seconds", "Attach and mount of a volume on its first Mount",
                         backend=backend)


def detach_timer(backend: str):
    """Around a last Unmount on this host: unmount + detach."""
    return metrics.timed("detach_duration_seconds", "Unmount and detach of a volume on its last Unmount",
                         backend=backend)


def lock_takeover() -> None:
    metrics.count("lock_takeovers", "Volume locks taken over from a dead holder after fencing it")


class StateCollector:
    def __init__(self, driver):
        self.driver = driver

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        state = self.driver.state
        backend_of = {v["name"]: v["options"]["backend"] for v in state.volumes() if v["status"] == READY}
        volumes = dict.fromkeys(self.driver.backends, 0)
        for backend in backend_of.values():
            volumes[backend] = volumes.get(backend, 0) + 1
        mounted = dict.fromkeys(self.driver.backends, 0)
        callers = 0
        for attachment in state.attachments():
            backend = backend_of.get(attachment["volume"], "unknown")
            mounted[backend] = mounted.get(backend, 0) + 1
            callers += len(state.callers(attachment["volume"]))
        for name, doc, counts in (
                ("volplugin_volumes", "Volumes in this host's state, by backend", volumes),
                ("volplugin_mounted_volumes", "Volumes attached and mounted on this host, by backend", mounted)):
            family = GaugeMetricFamily(name, doc, labels=["backend"])
            for backend, n in sorted(counts.items()):
                family.add_metric([backend], n)
            yield family
        yield GaugeMetricFamily("volplugin_mount_callers", "Docker mount IDs (containers) holding the "
                                "volumes mounted on this host", value=callers)


def collectors(app) -> list:
    """The scrape-time collectors for a worker's app (plugincore.metrics.Exporter)."""
    return [StateCollector(app.extensions["volplugin.driver"])]

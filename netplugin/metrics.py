"""netplugin's gauges, computed from its state when Prometheus scrapes (see plugincore/metrics.py).

Read at scrape time from the SQLite state (and, with cluster.store = "etcd", the pools from etcd)
instead of kept as per-process gauges: every worker changes the state, none of them knows the totals.
"""
import logging

log = logging.getLogger("netplugin.metrics")


class StateCollector:
    def __init__(self, driver, ipam):
        self.driver = driver
        self.ipam = ipam

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        for name, family in (("networks", self._networks), ("endpoints", self._endpoints),
                             ("ipam", self._ipam)):
            try:
                yield from family(GaugeMetricFamily)
            except Exception as exc:  # noqa: BLE001 - one unreadable source (etcd down) must not fail the scrape
                log.warning("metrics: %s not collected: %s", name, exc)

    def _networks(self, gauge):
        counts = {mode.name: 0 for mode in self.driver.modes}
        for net in self.driver.state.networks():
            counts[net.mode] = counts.get(net.mode, 0) + 1
        family = gauge("netplugin_networks", "Networks of this host by mode", labels=["mode"])
        for mode, n in sorted(counts.items()):
            family.add_metric([mode], n)
        yield family

    def _endpoints(self, gauge):
        networks = {net.id: net for net in self.driver.state.networks()}
        endpoints = self.driver.state.endpoints()
        yield gauge("netplugin_endpoints", "Endpoints on this host", value=len(endpoints))
        yield gauge("netplugin_joined_endpoints", "Endpoints joined to a container (between Join and Leave)",
                    value=sum(1 for ep in endpoints if ep.sandbox))
        shaped = {"egress": 0, "ingress": 0}
        for ep in endpoints:
            net = networks.get(ep.network_id)
            if net is None:
                continue
            for direction, rate in self.driver.shaper.effective(net, ep).items():
                shaped[direction] += rate is not None
        family = gauge("netplugin_shaped_endpoints", "Endpoints with a rate limit, by direction",
                       labels=["direction"])
        for direction, n in shaped.items():
            family.add_metric([direction], n)
        yield family

    def _ipam(self, gauge):
        pools = self.ipam.pools()
        in_use = gauge("netplugin_ipam_addresses_in_use", "Addresses allocated in an IPAM pool (gateway "
                       "included; cluster-wide with the etcd store)", labels=["pool"])
        for pool in pools:
            in_use.add_metric([pool["id"]], pool["in_use"])
        yield gauge("netplugin_ipam_pools", "IPAM pools in use", value=len(pools))
        yield in_use


def collectors(app) -> list:
    """The scrape-time collectors for a worker's app (plugincore.metrics.Exporter)."""
    return [StateCollector(app.extensions["netplugin.driver"], app.extensions["netplugin.ipam"])]

"""The overlay agent: keeps this host's VXLAN forwarding tables equal to what the other hosts publish.

One agent per host (plugincore.background elects one gunicorn worker to run it). It reads every published endpoint once, programs each local overlay
network's VXLAN device, then follows etcd's watch: a change to an overlay's endpoints re-reads that
overlay and syncs its devices (one range read, one FDB dump, only the differences written), so a
container started on host B is reachable from host A a few milliseconds after B's Join. A full pass
runs again every ``full_resync`` seconds and after any error (etcd down, watch lost), which also
publishes this host's joined endpoints the store misses and withdraws the ones it no longer runs (a
Leave while etcd was down). It also keeps this host's liveness record (hosts/<id>, on a lease) alive.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time

from pyroute2 import IPRoute

from plugincore.errors import BackendError
from .cluster.etcd import ClusterUnavailable, WatchLost
from .state import READY

log = logging.getLogger("netplugin.overlay_agent")
MODE = "overlay"


class OverlayAgent:
    def __init__(self, services, *, full_resync: float = 60.0, retry: float = 1.0):
        self.driver = services.driver
        self.overlays = services.overlays
        self.etcd = services.etcd
        self.host_id = services.host_id
        self.ttl = max(int(services.cluster["host_ttl"]), 3)
        self.host_info = {"vtep": services.cluster["vtep_address"], "underlay": services.cluster["underlay"]}
        self.full_resync = full_resync
        self.retry = retry
        self.lease = 0
        self.mode = self.driver.modes.get(MODE)

    def local_networks(self) -> dict[str, list]:
        """Overlay name -> this host's ready overlay networks on it (usually one)."""
        found: dict[str, list] = {}
        for net in self.driver.state.networks():
            if net.mode == MODE and net.status == READY and net.kernel.get("vni") is not None:
                found.setdefault(net.options["overlay"], []).append(net)
        return found

    def sync_all(self) -> int:
        """Program every local overlay from one read of all endpoints; returns the read's revision."""
        by_overlay, revision = self.overlays.all_endpoints()
        networks = self.local_networks()
        with IPRoute() as ipr:
            for name, nets in networks.items():
                for net in nets:
                    self._sync_network(ipr, net, by_overlay.get(name, []))
        self._settle_own(by_overlay, networks)
        self._settle_memberships()
        return revision

    def sync_overlay(self, name: str) -> None:
        nets = self.local_networks().get(name)
        if not nets:
            return  # not an overlay this host takes part in
        endpoints = self.overlays.endpoints(name)
        with IPRoute() as ipr:
            for net in nets:
                self._sync_network(ipr, net, endpoints)

    def _sync_network(self, ipr, net, endpoints) -> None:
        try:
            changed = self.mode.sync_forwarding(ipr, net, endpoints)
        except BackendError as exc:  # e.g. the network is being deleted right now
            log.warning("overlay %s: forwarding table of %s not synced: %s", net.options["overlay"],
                        net.kernel["uplink"], exc)
            return
        if changed.get("added") or changed.get("removed"):
            log.info("overlay %s: %s forwarding entries +%d -%d", net.options["overlay"], net.kernel["uplink"],
                     changed.get("added", 0), changed.get("removed", 0))

    def _settle_own(self, by_overlay: dict, networks: dict) -> None:
        """Publish this host's joined endpoints the store misses; withdraw the ones it published that
        are no longer joined here. Each decision is re-checked under the network's lock, so a Join or
        Leave in progress (publish and state change happen under that lock) is never undone."""
        published = {e["id"]: (name, e) for name, endpoints in by_overlay.items() for e in endpoints}
        for endpoint_id, (name, record) in published.items():
            if record.get("host") == self.host_id and self._withdraw_if_gone(name, record):
                log.info("withdrew endpoint %s of overlay %s: no longer joined here", endpoint_id[:12], name)
        for nets in networks.values():
            for net in nets:
                for ep in self.driver.state.endpoints(net.id):
                    if ep.sandbox and ep.id not in published:
                        with self.driver.network_lock(net.id):
                            current = self.driver.state.get_endpoint(ep.id)
                            if current is not None and current.sandbox:
                                log.info("publishing endpoint %s of overlay %s", ep.id[:12], net.options["overlay"])
                                self.mode.publish(net, current)

    def _settle_memberships(self) -> None:
        """Leave overlays for networks this host no longer has: a create whose attach timed out may
        have been carried out by etcd after all (the request had been sent). A network being created
        already has its row (written before the attach), so it is never mistaken for one."""
        for name, network_id in self.overlays.memberships(self.host_id):
            if self.driver.state.get_network(network_id) is None:
                with self.driver.network_lock(network_id):
                    if self.driver.state.get_network(network_id) is None:
                        log.info("leaving overlay %s: network %s is gone here", name, network_id[:12])
                        self.overlays.detach(name, network_id)

    def _withdraw_if_gone(self, name: str, record: dict) -> bool:
        network_id = record.get("network") or ""
        with self.driver.network_lock(network_id) if network_id else contextlib.nullcontext():
            ep = self.driver.state.get_endpoint(record["id"])
            if ep is not None and ep.sandbox:
                return False
            self.overlays.withdraw(name, record["id"])
            return True

    def keepalive(self) -> None:
        if self.lease and self.etcd.lease_keepalive(self.lease) > 0:
            return
        self.lease = self.etcd.lease_grant(self.ttl)
        self.overlays.register_host(self.host_info, self.lease)

    def run(self, stop: threading.Event) -> None:
        revision, last_full, failures = None, 0.0, 0
        idle = max(self.ttl / 3, 1.0)  # the watch returns this often when idle: keepalive in between
        while not stop.is_set():
            try:
                if revision is None or time.monotonic() - last_full > self.full_resync:
                    revision, last_full = self.sync_all(), time.monotonic()
                self.keepalive()
                if failures:
                    log.info("cluster store reachable again; overlays resynced")
                    failures = 0
                for name, mod_revision in self.overlays.watch_endpoints(revision + 1, idle):
                    self.sync_overlay(name)
                    revision = max(revision, mod_revision)
                    if stop.is_set():
                        return
            except (ClusterUnavailable, WatchLost, BackendError) as exc:
                failures += 1
                if failures == 1 or failures % 60 == 0:
                    log.warning("overlay agent: %s; retrying", exc)
                revision = None
                stop.wait(self.retry)
            except Exception:  # noqa: BLE001 - the agent must outlive surprises; the next pass repairs
                log.exception("overlay agent pass failed")
                revision = None
                stop.wait(self.retry)

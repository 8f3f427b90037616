"""Rates from container labels: ``--label netplugin.egress=100mbit`` (and ``netplugin.ingress``).

A background thread in one gunicorn worker (plugincore.background) follows Docker's events through the
Docker SDK - never from inside a plugin request handler, where calling back into dockerd can deadlock it
(it may be waiting for this very plugin). At start and after every reconnect it goes through the
running containers; then each container ``start`` and network ``connect`` event applies that
container's labels to its endpoints on this plugin's networks (the "label" source: below a live
`netplugin shape`, above driver options and network defaults). A bad label value is logged and ignored.
"""
from __future__ import annotations

import logging
import threading
import time

from plugincore.errors import InvalidRequest, NotFound, PluginError
from .shaping import DIRECTIONS, parse_rates

log = logging.getLogger("netplugin.labels")
LABELS = {direction: f"netplugin.{direction}" for direction in DIRECTIONS}


class LabelWatcher:
    def __init__(self, driver, docker_host: str, retry: float = 2.0):
        self.driver = driver
        self.docker_host = docker_host
        self.retry = retry

    def rates_of(self, attrs: dict) -> dict[str, int | None]:
        labels = (attrs.get("Config") or {}).get("Labels") or {}
        rates: dict[str, int | None] = {}
        for direction, label in LABELS.items():
            try:
                rates[direction] = parse_rates({direction: labels.get(label)}, f"label {label}").get(direction)
            except InvalidRequest as exc:
                log.warning("container %s: %s; label ignored", attrs.get("Name", "?").lstrip("/"), exc)
                rates[direction] = None
        return rates

    def apply(self, attrs: dict) -> int:
        """Apply one container's labels to its endpoints here; how many endpoints were ours."""
        rates = self.rates_of(attrs)
        networks = (attrs.get("NetworkSettings") or {}).get("Networks") or {}
        applied = 0
        for network in networks.values():
            endpoint_id = network.get("EndpointID")
            if not endpoint_id or self.driver.state.get_endpoint(endpoint_id) is None:
                continue  # another driver's network
            if not any(rates.values()) and not self.driver.shaper.stored(endpoint_id).get("label"):
                continue
            try:
                self.driver.set_rates(endpoint_id, "label", rates)
                applied += 1
            except NotFound:
                continue  # it left meanwhile
            except PluginError as exc:
                log.warning("container %s: label rates not applied: %s", attrs.get("Name", "?").lstrip("/"), exc)
        return applied

    def sync_all(self, client) -> None:
        for summary in client.api.containers():
            try:
                self.apply(client.api.inspect_container(summary["Id"]))
            except Exception as exc:  # noqa: BLE001 - e.g. the container went away
                log.debug("container %s: %s", summary["Id"][:12], exc)

    def _on_event(self, client, event: dict) -> None:
        import docker

        if event.get("Type") == "container":
            container = event.get("id")
        else:
            container = (event.get("Actor") or {}).get("Attributes", {}).get("container")
        if container:
            try:
                self.apply(client.api.inspect_container(container))
            except docker.errors.NotFound:
                pass

    @staticmethod
    def _close_on_stop(stop: threading.Event, done: threading.Event, events) -> None:
        """Unblock the event stream when asked to stop; end with it otherwise."""
        while not done.is_set():
            if stop.wait(0.5):
                events.close()
                return

    def run(self, stop: threading.Event) -> None:
        import docker

        failures = 0
        while not stop.is_set():
            client = None
            try:
                client = docker.DockerClient(base_url=self.docker_host, timeout=30)
                since = int(time.time())
                self.sync_all(client)
                if failures:
                    log.info("Docker reachable again at %s", self.docker_host)
                failures = 0
                events = client.events(decode=True, since=since, filters={
                    "type": ["container", "network"], "event": ["start", "connect"]})
                done = threading.Event()
                threading.Thread(target=self._close_on_stop, args=(stop, done, events), daemon=True).start()
                try:
                    for event in events:
                        self._on_event(client, event)
                finally:
                    done.set()
            except Exception as exc:  # noqa: BLE001 - dockerd not (yet) there, restarted...
                failures += 1
                if failures == 1 or failures % 30 == 0:
                    log.warning("label watcher: Docker at %s: %s; retrying", self.docker_host, exc)
            finally:
                if client is not None:
                    client.close()
            stop.wait(self.retry)

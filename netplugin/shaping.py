"""Per-endpoint bandwidth limits: where a rate comes from, and making the kernel match it.

A rate has four possible sources, first one present wins:

    admin    `netplugin shape` / POST /NetPlugin.Shape (a live change, kept until cleared)
    label    the container's `netplugin.egress` / `netplugin.ingress` label (the label watcher)
    option   the endpoint's `--driver-opt egress=...` / `ingress=...`
    network  the network's `-o egress=...` / `-o ingress=...`

Admin and label rates are rows of ``shape_rates``; option and network rates live in the endpoint's and
the network's options. Egress of a bridged network is an HTB class on its egress device (the uplink:
parent NIC, VLAN or VXLAN device), chosen by source address through one ipset + one mangle rule
(netplugin.kernel.shaping); its class number is a row of ``shape_classes``. Ingress is a rate limit on
the endpoint's host-side veth. SR-IOV endpoints use the VF's hardware max tx rate instead.
"""
from __future__ import annotations

import ipaddress
import logging

from plugincore.errors import InvalidRequest
from .kernel import shaping as tc

log = logging.getLogger("netplugin.shaping")
DIRECTIONS = ("egress", "ingress")
SOURCES = ("admin", "label", "option", "network")
MINOR_FIRST, MINOR_LAST = 0x10, 0xFFFE

SHAPING_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS shape_rates (
        endpoint_id TEXT NOT NULL,
        source TEXT NOT NULL CHECK (source IN ('admin', 'label')),
        direction TEXT NOT NULL CHECK (direction IN ('egress', 'ingress')),
        rate INTEGER NOT NULL,
        PRIMARY KEY (endpoint_id, source, direction))""",
    """CREATE TABLE IF NOT EXISTS shape_classes (
        endpoint_id TEXT PRIMARY KEY,
        minor INTEGER NOT NULL UNIQUE,
        device TEXT NOT NULL,
        address TEXT NOT NULL)""",
]
RATE_OPTIONS = {
    "egress": "outbound rate limit of each container (tc units: 500kbit, 50mbit, 1gbit)",
    "ingress": "inbound rate limit of each container (tc units)",
}


def parse_rates(options: dict, what: str) -> dict[str, int]:
    """The egress/ingress entries of a network's or endpoint's options, checked ({} when none). An
    SR-IOV endpoint's ``rate`` (whole Mbit/s, its older spelling) counts as egress."""
    rates = {}
    if options.get("rate") not in (None, "") and options.get("egress") in (None, ""):
        text = str(options["rate"]).strip().lower()
        options = {**options, "egress": text if text.endswith("mbit") else f"{text}mbit"}
    for direction in DIRECTIONS:
        value = options.get(direction)
        if value not in (None, ""):
            try:
                rates[direction] = tc.parse_rate(str(value))
            except InvalidRequest as exc:
                raise InvalidRequest(f"{what} {direction}: {exc}") from None
    return rates


class Shaper:
    def __init__(self, store):
        self.store = store

    # ---- rates ---------------------------------------------------------------------------

    def stored(self, endpoint_id: str) -> dict[str, dict[str, int]]:
        """{source: {direction: bits/s}} of the admin and label rows."""
        found: dict[str, dict[str, int]] = {}
        for row in self.store.read().execute(
                "SELECT source, direction, rate FROM shape_rates WHERE endpoint_id = ?", (endpoint_id,)):
            found.setdefault(row["source"], {})[row["direction"]] = row["rate"]
        return found

    def set_rates(self, endpoint_id: str, source: str, rates: dict[str, int | None]) -> None:
        """Set (a number) or clear (None) ``source``'s rate per direction given."""
        with self.store.transaction() as db:
            for direction, rate in rates.items():
                db.execute("DELETE FROM shape_rates WHERE endpoint_id = ? AND source = ? AND direction = ?",
                           (endpoint_id, source, direction))
                if rate is not None:
                    db.execute("INSERT INTO shape_rates (endpoint_id, source, direction, rate) VALUES (?, ?, ?, ?)",
                               (endpoint_id, source, direction, rate))

    def effective(self, net, ep) -> dict[str, tuple[int, str] | None]:
        """{direction: (bits/s, source) or None}: the first source that sets it."""
        layers = self.stored(ep.id)
        layers["option"] = parse_rates(ep.options, "endpoint option")
        layers["network"] = {d: net.options[d] for d in DIRECTIONS if net.options.get(d)}
        return {d: next(((layers[s][d], s) for s in SOURCES if d in layers.get(s, {})), None) for d in DIRECTIONS}

    # ---- kernel --------------------------------------------------------------------------

    def apply(self, ipr, net, ep, mode) -> dict:
        """Make the kernel enforce ``ep``'s effective rates (called at Join, on a change, at start-up)."""
        rates = self.effective(net, ep)
        device = mode.shaping_device(net)
        if device is None:  # the mode enforces it itself (SR-IOV: the VF's max tx rate)
            if rates["ingress"] is not None:
                raise InvalidRequest(f"ingress limits are not supported in {mode.name} mode")
            mode.apply_egress(ipr, net, ep, rates["egress"][0] if rates["egress"] else 0)
            return rates
        address = str(ipaddress.ip_interface(ep.address).ip) if ep.address else ""
        if rates["egress"] is not None and address:
            minor = self._minor(ep.id, device, address)
            tc.ensure_htb(ipr, device)
            tc.ensure_class(ipr, device, minor, rates["egress"][0])
            tc.ensure_classifier()
            tc.add_entry(address, minor)
        else:
            self._drop_class(ipr, ep.id)
        host_if = ep.kernel.get("host_if")
        if host_if:
            if rates["ingress"] is not None:
                tc.ensure_ingress_limit(ipr, host_if, rates["ingress"][0])
            else:
                tc.remove_ingress_limit(ipr, host_if)
        return rates

    def remove(self, ipr, ep) -> None:
        """At Leave/DeleteEndpoint: its class and set entry go (the veth and its qdisc go with it)."""
        self._drop_class(ipr, ep.id)

    def forget(self, endpoint_id: str) -> None:
        """At DeleteEndpoint: its admin and label rates go too."""
        with self.store.transaction() as db:
            db.execute("DELETE FROM shape_rates WHERE endpoint_id = ?", (endpoint_id,))

    def network_removed(self, ipr, device: str | None) -> None:
        if device and not self.store.read().execute(
                "SELECT 1 FROM shape_classes WHERE device = ? LIMIT 1", (device,)).fetchone():
            tc.remove_htb(ipr, device)

    def _minor(self, endpoint_id: str, device: str, address: str) -> int:
        with self.store.transaction() as db:
            row = db.execute("SELECT minor, device, address FROM shape_classes WHERE endpoint_id = ?",
                             (endpoint_id,)).fetchone()
            if row is not None and (row["device"], row["address"]) == (device, address):
                return row["minor"]
            if row is not None:
                db.execute("DELETE FROM shape_classes WHERE endpoint_id = ?", (endpoint_id,))
            used = {r["minor"] for r in db.execute("SELECT minor FROM shape_classes")}
            minor = next((m for m in range(MINOR_FIRST, MINOR_LAST + 1) if m not in used), None)
            if minor is None:
                raise InvalidRequest("no free traffic class left (65,000 shaped endpoints on this host)")
            db.execute("INSERT INTO shape_classes (endpoint_id, minor, device, address) VALUES (?, ?, ?, ?)",
                       (endpoint_id, minor, device, address))
            return minor

    def _drop_class(self, ipr, endpoint_id: str) -> None:
        row = self.store.read().execute("SELECT minor, device, address FROM shape_classes WHERE endpoint_id = ?",
                                        (endpoint_id,)).fetchone()
        if row is None:
            return
        tc.remove_entry(row["address"])
        tc.remove_class(ipr, row["device"], row["minor"])
        with self.store.transaction() as db:
            db.execute("DELETE FROM shape_classes WHERE endpoint_id = ?", (endpoint_id,))
            last = db.execute("SELECT 1 FROM shape_classes LIMIT 1").fetchone() is None
        if last:  # nothing shaped on this host any more: no rule, chain or set left behind
            tc.remove_classifier()

    def reconcile(self, ipr, joined: list, existing: set[str], lookup) -> dict:
        """At start-up: classes, set entries and ingress limits of the joined endpoints re-applied, the
        set's members exactly those, classes and rows of endpoints that are gone removed; admin and
        label rates kept for every endpoint that still exists. ``lookup(ep) -> (net, mode)``."""
        alive = {ep.id for ep in joined}
        with self.store.transaction() as db:
            before = {(r["device"], r["minor"]) for r in db.execute("SELECT device, minor FROM shape_classes")}
            gone = [r["endpoint_id"] for r in db.execute("SELECT endpoint_id FROM shape_classes")
                    if r["endpoint_id"] not in alive]
            for endpoint_id in gone:
                db.execute("DELETE FROM shape_classes WHERE endpoint_id = ?", (endpoint_id,))
            stale = [r["endpoint_id"] for r in db.execute("SELECT DISTINCT endpoint_id FROM shape_rates")
                     if r["endpoint_id"] not in existing]
            for endpoint_id in stale:
                db.execute("DELETE FROM shape_rates WHERE endpoint_id = ?", (endpoint_id,))
        shaped = 0
        for ep in joined:
            net, mode = lookup(ep)
            try:
                if any(self.apply(ipr, net, ep, mode).values()):
                    shaped += 1
            except Exception:  # noqa: BLE001 - one endpoint must not stop the others
                log.exception("could not re-apply the rate limits of endpoint %s", ep.id[:12])
        rows = self.store.read().execute("SELECT address, minor, device FROM shape_classes").fetchall()
        wanted = {(r["device"], r["minor"]) for r in rows}
        for device in {d for d, _ in before | wanted}:
            try:
                for minor in set(tc.classes(ipr, device)) - {m for d, m in wanted if d == device}:
                    tc.remove_class(ipr, device, minor)  # an endpoint that went while we were down
            except Exception:  # noqa: BLE001 - e.g. the device is gone with its classes
                log.debug("classes of %s not checked", device, exc_info=True)
        entries = {r["address"]: r["minor"] for r in rows}
        if entries:
            tc.ensure_classifier()
            tc.set_entries(entries)
        elif tc.classifier_present():  # the last class went but the plugin died before the rule did
            tc.remove_classifier(force=True)  # with any stale members: no class is wanted
        return {"shaped_endpoints": shaped}

    def report(self, net, ep) -> dict:
        """For status and EndpointOperInfo: {"egress": "50mbit (admin)", ...}."""
        return {d: (f"{tc.format_rate(r[0])} ({r[1]})" if r else "") for d, r in self.effective(net, ep).items()}

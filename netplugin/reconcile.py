"""Start-up reconciliation: make the kernel match the persisted state before Docker's first request.

Finishes or undoes operations a crash interrupted, repairs the pieces of live networks and endpoints,
removes links the plugin owns (by name prefix) that no state explains, and rebuilds the FORWARD chain.
"""
import logging

from pyroute2 import IPRoute

from .kernel import links, names
from .state import READY

log = logging.getLogger("netplugin.reconcile")


def reconcile(driver) -> dict:
    summary = {"networks": 0, "repaired_endpoints": 0, "lost_endpoints": 0, "undone_networks": 0,
               "dropped_endpoints": 0, "orphan_links": 0}
    state = driver.state
    with IPRoute() as ipr:
        for net in state.networks():
            if net.status != READY:
                try:
                    driver._teardown(ipr, net)
                    summary["undone_networks"] += 1
                except Exception:  # noqa: BLE001 - one broken network must not stop the others
                    log.exception("could not finish tearing down network %s", net.id[:12])
                continue
            try:
                driver.modes.get(net.mode).ensure_network(ipr, net)
                summary["networks"] += 1
            except Exception:  # noqa: BLE001
                log.exception("could not repair network %s", net.id[:12])
        live = {net.id: net for net in state.networks() if net.status == READY}
        existing = {link.name: link for link in links.list_links(ipr)}
        keep = {link for net in live.values() for link in driver.modes.get(net.mode).owned_links(net)}
        for ep in state.endpoints():
            net = live.get(ep.network_id)
            if net is None:
                state.drop_endpoint(ep.id)
                summary["dropped_endpoints"] += 1
            elif ep.sandbox:
                if driver.modes.get(net.mode).repair_endpoint(ipr, net, ep, existing):
                    keep.update(ep.kernel.values())
                    summary["repaired_endpoints"] += 1
                else:
                    # Its container end vanished with it (or a Leave was cut short): not joined any more,
                    # so its class and set entry go below. Docker's Leave/DeleteEndpoint still succeed.
                    log.warning("endpoint %s lost its interface", ep.id[:12])
                    state.set_endpoint_join(ep.id, "", {})
                    summary["lost_endpoints"] += 1
        for link in existing.values():
            if names.is_owned(link.name) and link.name not in keep:
                log.info("removing orphan link %s", link.name)
                links.remove_link(ipr, link.name)
                summary["orphan_links"] += 1
        joined = [ep for ep in state.endpoints() if ep.sandbox and ep.network_id in live]
        summary.update(driver.shaper.reconcile(
            ipr, joined, {ep.id for ep in state.endpoints()},
            lambda ep: (live[ep.network_id], driver.modes.get(live[ep.network_id].mode))))
        for mode in driver.modes:  # the modes' own state (sriov: the VF inventory)
            try:
                summary.update(mode.reconcile(ipr, state))
            except Exception:  # noqa: BLE001
                log.exception("could not reconcile %s mode state", mode.name)
    driver.sync_firewall()
    log.info("reconciled: %s", summary)
    return summary

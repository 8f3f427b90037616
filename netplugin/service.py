"""Wiring: configuration -> state store, IPAM, driver -> Flask app."""
import os

from plugincore.app import create_app as create_plugin_app
from plugincore.locks import LockDir
from plugincore.store import Store
from .driver import NetworkDriver
from .ipam import IPAM_SCHEMA, Ipam
from .modes import ModeRegistry
from .sriov_inventory import SRIOV_SCHEMA
from .state import NETWORK_SCHEMA, NetworkState


class Services:
    def __init__(self, config: dict):
        state_dir = config["state_dir"]
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        self.store = Store(os.path.join(state_dir, "netplugin.db"),
                           NETWORK_SCHEMA + IPAM_SCHEMA + SRIOV_SCHEMA)
        ipam_cfg = config["ipam"]
        self.ipam = Ipam(self.store, ipam_cfg["default_supernet"], ipam_cfg["default_prefix"],
                         ipam_cfg["default_supernet_v6"] or None, ipam_cfg["default_prefix_v6"])
        locks = LockDir(os.path.join(state_dir, "locks"))
        self.driver = NetworkDriver(NetworkState(self.store), locks, ModeRegistry(self.store, locks))


def create_app(config: dict, services: Services | None = None):
    services = services or Services(config)
    from .api import bp
    return create_plugin_app("netplugin", ["NetworkDriver", "IpamDriver"], [bp],
                             {"netplugin.driver": services.driver, "netplugin.ipam": services.ipam})

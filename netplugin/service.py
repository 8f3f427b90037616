"""Wiring: configuration -> state store, cluster store, IPAM, overlay registry, driver -> Flask app."""
import os
import socket

from plugincore.app import create_app as create_plugin_app
from plugincore.errors import InvalidRequest
from plugincore.locks import LockDir
from plugincore.store import Store
from .cluster.etcd import Etcd
from .cluster.overlays import VNI_MAX, LocalOverlays, SharedOverlays
from .driver import NetworkDriver
from .ipam import IPAM_SCHEMA, Ipam
from .ipam.shared import SharedIpam
from .modes import ModeContext, ModeRegistry
from .shaping import SHAPING_SCHEMA, Shaper
from .sriov_inventory import SRIOV_SCHEMA
from .state import NETWORK_SCHEMA, NetworkState

STORES = ("local", "etcd")
SCOPES = ("auto", "local", "global")


def check_cluster_config(cluster: dict) -> None:
    """A bad [cluster] section stops the service at start, not at the first request."""
    if cluster["store"] not in STORES:
        raise InvalidRequest(f"cluster.store {cluster['store']!r} is not one of {', '.join(STORES)}")
    if cluster["scope"] not in SCOPES:
        raise InvalidRequest(f"cluster.scope {cluster['scope']!r} is not one of {', '.join(SCOPES)}")
    if not 1 <= cluster["vni_min"] <= cluster["vni_max"] <= VNI_MAX:
        raise InvalidRequest(f"cluster.vni_min/vni_max must satisfy 1 <= min <= max <= {VNI_MAX}")


class Services:
    def __init__(self, config: dict):
        state_dir = config["state_dir"]
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        cluster = self.cluster = config["cluster"]
        check_cluster_config(cluster)
        self.host_id = cluster["host_id"] or socket.gethostname()
        self.store = Store(os.path.join(state_dir, "netplugin.db"),
                           NETWORK_SCHEMA + IPAM_SCHEMA + SRIOV_SCHEMA + LocalOverlays.SCHEMA + SHAPING_SCHEMA)
        ipam_cfg = config["ipam"]
        defaults = (ipam_cfg["default_supernet"], ipam_cfg["default_prefix"],
                    ipam_cfg["default_supernet_v6"] or None, ipam_cfg["default_prefix_v6"])
        self.etcd = None
        if cluster["store"] == "etcd":
            self.etcd = Etcd(cluster["etcd_endpoints"], cluster["etcd_prefix"], cluster["etcd_timeout"])
            self.ipam = SharedIpam(self.etcd, self.host_id, *defaults)
            self.overlays = SharedOverlays(self.etcd, self.host_id, cluster["vni_min"], cluster["vni_max"])
        else:
            self.ipam = Ipam(self.store, *defaults)
            self.overlays = LocalOverlays(self.store, cluster["vni_min"], cluster["vni_max"])
        scope = cluster["scope"]
        if scope == "auto":
            scope = "global" if self.etcd is not None else "local"
        locks = LockDir(os.path.join(state_dir, "locks"))
        ctx = ModeContext(store=self.store, locks=locks, overlays=self.overlays, cluster=cluster)
        self.driver = NetworkDriver(NetworkState(self.store), locks, ModeRegistry(ctx), Shaper(self.store),
                                    scope=scope)


def create_app(config: dict, services: Services | None = None):
    services = services or Services(config)
    from .api import bp
    return create_plugin_app("netplugin", ["NetworkDriver", "IpamDriver"], [bp],
                             {"netplugin.driver": services.driver, "netplugin.ipam": services.ipam})

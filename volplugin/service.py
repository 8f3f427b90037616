"""Wiring: configuration -> state store, backends, driver -> Flask app."""
import logging
import os

from plugincore.app import create_app as create_plugin_app
from plugincore.locks import LockDir
from plugincore.store import Store
from .driver import VolumeDriver
from .state import VOLUME_SCHEMA, VolumeState

log = logging.getLogger("volplugin.service")


def embedded_cluster(config: dict):
    """The single-node Ceph cluster kept in the state directory when no cluster is configured."""
    from .cephlab import EmbeddedCeph

    rbd = config["rbd"]
    return EmbeddedCeph(os.path.join(config["state_dir"], "ceph"), mon_port=rbd["embedded_mon_port"],
                        pool=rbd["pool"], store_gib=rbd["embedded_store_gib"])


def rbd_conf_path(config: dict) -> str:
    return config["rbd"]["conf"] or embedded_cluster(config).conf_path


def build_rbd_backend(config: dict):
    from .backends.rbd import RbdBackend

    rbd = config["rbd"]
    return RbdBackend(conf_path=rbd_conf_path(config), pool=rbd["pool"], client_name=rbd["client_name"],
                      keyring=rbd["keyring"] or None, host_id=config["host_id"],
                      state_dir=os.path.join(config["state_dir"], "rbd"), connect_timeout=rbd["connect_timeout"],
                      op_timeout=rbd["op_timeout"], fence_grace=rbd["fence_grace"],
                      trash_retention=rbd["trash_retention"])


def build_lvm_backend(config: dict):
    from .backends.lvm import LvmBackend

    lvm = config["lvm"]
    return LvmBackend(vg=lvm["vg"], thin_pool=lvm["thin_pool"], host_id=config["host_id"],
                      state_dir=os.path.join(config["state_dir"], "lvm"), timeout=lvm["timeout"],
                      monitoring=lvm["monitoring"], max_overcommit=lvm["max_overcommit"],
                      max_pool_percent=lvm["max_pool_percent"], warn_pool_percent=lvm["warn_pool_percent"])


BUILDERS = {"rbd": build_rbd_backend, "lvm": build_lvm_backend}


def build_backends(config: dict) -> dict:
    return {name: BUILDERS[name](config) for name in config["backends"]}


def shared_catalog(backends: dict):
    """The catalog every host sees (the RBD backend's, in the cluster), else a host-local one."""
    from .backends.base import LocalOnlyCatalog

    return next((b for b in backends.values() if not b.host_local), LocalOnlyCatalog())


class Services:
    def __init__(self, config: dict, backends: dict | None = None, catalog=None):
        state_dir = config["state_dir"]
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        self.store = Store(os.path.join(state_dir, "volplugin.db"), VOLUME_SCHEMA)
        if backends is None:
            backends = build_backends(config)
        defaults = dict(config["volume"], pool="")  # each backend has its own default pool
        mount_root = config["mount_root"] or os.path.join(state_dir, "mounts")
        self.driver = VolumeDriver(VolumeState(self.store), LockDir(os.path.join(state_dir, "locks")), backends,
                                   host_id=config["host_id"], mount_root=mount_root,
                                   defaults=defaults, catalog=catalog or shared_catalog(backends))


def create_app(config: dict, services: Services | None = None):
    services = services or Services(config)
    from .api import bp
    return create_plugin_app("volplugin", ["VolumeDriver"], [bp], {"volplugin.driver": services.driver})

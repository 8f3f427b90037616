"""volplugin configuration keys and defaults (documented in config/volplugin.toml)."""
import socket

from plugincore import config as _config

DEFAULTS = {
    "socket": "/run/docker/plugins/volplugin.sock",
    "state_dir": "/var/lib/volplugin",
    "host_id": "",  # empty = this machine's hostname
    "workers": 2,
    "threads": 4,
    "log_level": "info",
    "volume": {
        "backend": "rbd",
        "size": "10G",
        "fs": "xfs",
        "uid": "999",
        "gid": "999",
        "pgdata": "pgdata",
    },
    "rbd": {
        "conf": "",  # empty = an embedded single-node cluster in <state_dir>/ceph
        "pool": "rbd",
        "client_name": "client.admin",
        "keyring": "",
        "connect_timeout": 10.0,
        "op_timeout": 30.0,
        "fence_grace": 30.0,
        "trash_retention": 86400.0,
        "embedded_mon_port": 0,
        "embedded_store_gib": 20,
    },
}


def load(path: str | None = None, overrides: dict | None = None, environ=None) -> dict:
    config = _config.load(DEFAULTS, "VOLPLUGIN", path, overrides, environ)
    config["host_id"] = config["host_id"] or socket.gethostname()
    return config

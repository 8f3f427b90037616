"""volplugin configuration keys and defaults (documented in config/volplugin.toml)."""
import socket

from plugincore import config as _config
from plugincore.errors import InvalidRequest
from plugincore.logs import check_format
from plugincore.metrics import parse_address

BACKENDS = ("rbd", "lvm")
DEFAULTS = {
    "socket": "/run/docker/plugins/volplugin.sock",
    "state_dir": "/var/lib/volplugin",
    "mount_root": "",  # where volumes are mounted; "" = <state_dir>/mounts
    "host_id": "",  # empty = this machine's hostname
    "workers": 2,
    "threads": 4,
    "log_level": "info",
    "log_format": "text",  # text | json (one object per line)
    "metrics_address": "",  # HOST:PORT of the Prometheus /metrics endpoint; "" = off
    "backends": ["rbd"],  # the storage backends this host serves
    "docker_host": "unix:///run/docker.sock",  # for the garbage collection only; "" = none
    "gc_interval": 60.0,  # seconds between garbage collections against Docker's containers; 0 = off
    "gc_grace": 120.0,  # how long no running container may have mounted a volume before it is released
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
    "lvm": {
        "vg": "volplugin",
        "thin_pool": "thinpool",
        "loop_file": "",  # a trial pool on a sparse file: re-attached to a loop device at start-up
        "timeout": 60.0,
        "monitoring": True,
        "max_overcommit": 4.0,
        "max_pool_percent": 90.0,
        "warn_pool_percent": 80.0,
    },
}


def load(path: str | None = None, overrides: dict | None = None, environ=None) -> dict:
    config = _config.load(DEFAULTS, "VOLPLUGIN", path, overrides, environ)
    config["host_id"] = config["host_id"] or socket.gethostname()
    check_format(config["log_format"])
    parse_address(config["metrics_address"])
    unknown = [b for b in config["backends"] if b not in BACKENDS]
    if unknown or not config["backends"]:
        raise InvalidRequest(f"backends {config['backends']!r}: choose from {', '.join(BACKENDS)}")
    if config["gc_interval"] < 0 or config["gc_grace"] < 0:
        raise InvalidRequest("gc_interval and gc_grace must not be negative")
    if config["volume"]["backend"] not in config["backends"]:
        raise InvalidRequest(f"volume.backend {config['volume']['backend']!r} is not among the configured "
                             f"backends ({', '.join(config['backends'])})")
    return config

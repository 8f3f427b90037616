"""netplugin configuration keys and their defaults (documented in config/netplugin.toml)."""
from plugincore import config as _config
from plugincore.errors import InvalidRequest
from plugincore.logs import check_format
from plugincore.metrics import parse_address

DEFAULTS = {
    "socket": "/run/docker/plugins/netplugin.sock",
    "state_dir": "/var/lib/netplugin",
    "workers": 2,
    "threads": 4,
    "log_level": "info",
    "log_format": "text",  # text | json (one object per line)
    "metrics_address": "",  # HOST:PORT of the Prometheus /metrics endpoint; "" = off
    "docker_host": "unix:///run/docker.sock",
    "labels": True,
    "gc_interval": 60.0,  # seconds between garbage collections against Docker's lists; 0 = off
    "gc_grace": 120.0,  # how long Docker must have been without an object before it is collected
    "ipam": {
        "default_supernet": "10.200.0.0/16",
        "default_prefix": 24,
        "default_supernet_v6": "",
        "default_prefix_v6": 64,
    },
    "cluster": {
        "store": "local",
        "etcd_endpoints": "",
        "etcd_prefix": "/netplugin/",
        "etcd_timeout": 5.0,
        "host_id": "",
        "scope": "auto",
        "underlay": "",
        "vtep_address": "",
        "vni_min": 4096,
        "vni_max": 16777215,
        "host_ttl": 15,
    },
}


def load(path: str | None = None, overrides: dict | None = None, environ=None) -> dict:
    config = _config.load(DEFAULTS, "NETPLUGIN", path, overrides, environ)
    check_format(config["log_format"])
    if config["gc_interval"] < 0 or config["gc_grace"] < 0:
        raise InvalidRequest("gc_interval and gc_grace must not be negative")
    parse_address(config["metrics_address"])
    return config

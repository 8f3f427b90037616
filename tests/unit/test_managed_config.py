"""The managed plugins' config.json templates (managed/*.config.json) against the code: interface types,
sockets where serve listens by default, every environment variable a configuration key the loader reads,
volplugin's mount root under its propagatedMount. The plugins themselves run in tests/e2e/test_managed_plugins.py."""
import json
from pathlib import Path

import pytest

from netplugin import config as netconfig
from volplugin import config as volconfig

MANAGED = Path(__file__).resolve().parents[2] / "managed"


def template(service: str) -> dict:
    return json.loads((MANAGED / f"{service}.config.json").read_text())


def env_of(config: dict) -> dict:
    return {e["name"]: e.get("value", "") for e in config["env"]}


@pytest.mark.parametrize("service, module, types", [
    ("netplugin", netconfig, ["docker.networkdriver/1.0", "docker.ipamdriver/1.0"]),
    ("volplugin", volconfig, ["docker.volumedriver/1.0"]),
])
def test_interface_and_socket(service, module, types):
    config = template(service)
    assert config["interface"]["types"] == types
    # Docker mounts the plugin's runtime directory at /run/docker/plugins: serve's default socket is there
    assert module.DEFAULTS["socket"] == f"/run/docker/plugins/{config['interface']['socket']}"
    assert config["network"]["type"] == "host"
    assert config["entrypoint"] == ["/usr/local/bin/docker-db-plugin-entrypoint", service]


@pytest.mark.parametrize("service, module, prefix", [
    ("netplugin", netconfig, "NETPLUGIN"), ("volplugin", volconfig, "VOLPLUGIN")])
def test_every_env_is_a_configuration_key_and_loads(service, module, prefix):
    env = env_of(template(service))
    known = set()
    for key, default in module.DEFAULTS.items():
        if isinstance(default, dict):
            known |= {f"{prefix}_{key}_{sub}".upper() for sub in default}
        else:
            known.add(f"{prefix}_{key}".upper())
    own = {"NETPLUGIN_IPTABLES"}  # read by the entrypoint, not by the configuration loader
    assert set(env) - known - own == set()
    config = module.load(environ={k: v for k, v in env.items() if k not in own})  # the defaults as shipped
    assert config["log_level"] == "info"


def test_volplugin_mounts_volumes_under_the_propagated_mount():
    config = template("volplugin")
    env = env_of(config)
    loaded = volconfig.load(environ=env)
    assert loaded["mount_root"] == config["propagatedMount"]
    state = [m for m in config["mounts"] if m["name"] == "state"][0]
    assert loaded["state_dir"] == state["destination"]
    # Docker mounts the propagated mount before the plugin's own mounts: none of them may cover it
    assert not any(config["propagatedMount"].startswith(m["destination"].rstrip("/") + "/") for m in config["mounts"])
    assert config["linux"]["allowAllDevices"] and "CAP_SYS_ADMIN" in config["linux"]["capabilities"]
    assert not any(e.get("settable") for e in config["env"] if e["name"] in ("VOLPLUGIN_MOUNT_ROOT",
                                                                             "VOLPLUGIN_STATE_DIR"))


def test_netplugin_state_survives_in_a_host_directory():
    config = template("netplugin")
    state = [m for m in config["mounts"] if m["name"] == "state"][0]
    assert state["destination"] == netconfig.DEFAULTS["state_dir"] and state["settable"] == ["source"]
    assert env_of(config)["NETPLUGIN_LABELS"] == "0"  # no Docker API socket inside the plugin by default

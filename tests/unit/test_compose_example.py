"""examples/compose/docker-compose.yml as Compose v1 reads it (`docker-compose config`, no engine): valid,
defaults and overrides substituted. The file's behaviour through a real dockerd: tests/e2e/test_compose.py."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")  # python3-yaml: docker-compose depends on it

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "compose" / "docker-compose.yml"
pytestmark = pytest.mark.skipif(shutil.which("docker-compose") is None,
                                reason="docker-compose is not installed (bash scripts/setup installs Debian's)")


def config(**variables) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DOCKER_", "COMPOSE_"))}
    env.update(variables)
    proc = subprocess.run(["docker-compose", "-f", str(EXAMPLE), "config"], capture_output=True, text=True,
                          timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    return yaml.safe_load(proc.stdout)


def test_defaults():
    c = config()
    net, vol = c["networks"]["pubnet"], c["volumes"]["pgdata"]
    assert net["driver"] == net["ipam"]["driver"] == "netplugin" and vol["driver"] == "volplugin"
    assert net["driver_opts"] == {"mode": "static", "parent": "eth1", "egress": "100mbit"}
    assert net["ipam"]["config"] == [{"subnet": "192.168.50.0/24", "gateway": "192.168.50.1"}]
    assert vol["driver_opts"] == {"size": "20G", "fs": "xfs", "uid": "999", "gid": "999"}
    db, client = c["services"]["db"], c["services"]["client"]
    assert db["image"] == client["image"] == "postgres:15"
    assert db["networks"]["pubnet"]["ipv4_address"] == "192.168.50.10"
    assert client["networks"]["pubnet"]["ipv4_address"] == "192.168.50.11"
    assert db["labels"] == {"netplugin.egress": "200mbit"} and client["labels"] == {"netplugin.ingress": "50mbit"}
    assert "pg_isready -h 192.168.50.10 " in client["command"][0]
    assert client["depends_on"] == {"db": {"condition": "service_healthy"}}


def test_variables_override():
    c = config(NETPLUGIN="nptest1", VOLPLUGIN="vptest1", PARENT="eth2", SUBNET="10.9.0.0/24", GATEWAY="10.9.0.1",
               DB_IP="10.9.0.5", CLIENT_IP="10.9.0.6", PG_IMAGE="my/pg:15", DB_EGRESS="1gbit", PG_SIZE="1G")
    net = c["networks"]["pubnet"]
    assert (net["driver"], net["ipam"]["driver"], c["volumes"]["pgdata"]["driver"]) == ("nptest1", "nptest1", "vptest1")
    assert net["driver_opts"]["parent"] == "eth2" and c["volumes"]["pgdata"]["driver_opts"]["size"] == "1G"
    assert c["services"]["db"]["networks"]["pubnet"]["ipv4_address"] == "10.9.0.5"
    assert "pg_isready -h 10.9.0.5 " in c["services"]["client"]["command"][0]
    assert c["services"]["db"]["labels"]["netplugin.egress"] == "1gbit"

"""Two emulated Docker hosts sharing one etcd, for overlay tests and the overlay bench.

    hosta (eth0 192.168.90.1): dockerd + plugin --+
                                                  +-- switch netns: bridge br0 + etcd 192.168.90.254
    hostb (eth0 192.168.90.2): dockerd + plugin --+

Each host has its own plugin instance (unique driver name, own state directory and host_id, scope
"local": plain Docker hosts, no swarm) and creates overlay networks itself with the same
``-o overlay`` name. Everything lives in the Lab's namespaces and temp dirs and goes in destroy().
"""
from __future__ import annotations

import json
from pathlib import Path

from .dockerd import Dockerd
from .etcd import EtcdServer
from .image import IMAGE
from .netns import Lab
from .plugin import Plugin

ETCD_IP = "192.168.90.254"
ETCD_PREFIX = "/e2e/"


class OverlayHost:
    def __init__(self, lab: Lab, ns: str, n: int, etcd_url: str, workdir: Path):
        self.lab, self.ns, self.n = lab, ns, n
        self.underlay_ip = f"192.168.90.{n}"
        workdir.mkdir(parents=True, exist_ok=True)
        config = workdir / "netplugin.toml"
        config.write_text(f'[cluster]\nstore = "etcd"\netcd_endpoints = "{etcd_url}"\nhost_id = "host{n}"\n'
                          f'scope = "local"\netcd_timeout = 2.0\netcd_prefix = "{ETCD_PREFIX}"\n')
        self.dockerd = Dockerd(ns, log_path=workdir / "dockerd.log")
        self.plugin = Plugin(ns, workdir / "plugin", extra_args=("--config", str(config)),
                             docker_host=self.dockerd.host)

    def start(self, image_tar: Path) -> "OverlayHost":
        self.plugin.start()
        self.dockerd.start()
        self.dockerd.import_image(image_tar, IMAGE)
        return self

    def docker(self, *args, check=True, timeout=60.0):
        return self.dockerd.docker(*args, check=check, timeout=timeout)

    def network(self, name: str, overlay: str, subnet: str, check=True):
        return self.docker("network", "create", "-d", self.plugin.name, "--ipam-driver", self.plugin.name,
                           "-o", "mode=overlay", "-o", f"overlay={overlay}", "-o", "parent=eth0",
                           "--subnet", subnet, "--internal", name, check=check)

    def run(self, name: str, network: str, *extra: str, check=True):
        return self.docker("run", "-d", "--network", network, *extra, "--name", name, IMAGE, "sleep", "3600",
                           check=check)

    def ip(self, container: str) -> str:
        nets = json.loads(self.docker("inspect", "-f", "{{json .NetworkSettings.Networks}}", container).stdout)
        return next(iter(nets.values()))["IPAddress"]

    def pid(self, container: str) -> int:
        return int(self.docker("inspect", "-f", "{{.State.Pid}}", container).stdout)

    def reaches(self, container: str, address: str) -> bool:
        return self.docker("exec", container, "ping", "-c", "1", "-W", "1", address, check=False).returncode == 0

    def owned_links(self) -> list[str]:
        return sorted(n for n in self.lab.links(self.ns) if n.startswith("np"))

    def destroy(self) -> None:
        try:
            if self.dockerd.alive() and self.plugin.alive():
                self.dockerd.remove_all_containers(timeout=60)
                self.dockerd.remove_networks(driver=self.plugin.name, timeout=60)
        finally:
            try:
                self.plugin.destroy()
            finally:
                self.dockerd.destroy()


class OverlayLab:
    """The topology above; ``hosts`` are started (plugin, dockerd, image) by start()."""

    def __init__(self, workdir: Path):
        self.workdir = Path(workdir)
        self.lab = Lab()
        self.etcd: EtcdServer | None = None
        self.hosts: list[OverlayHost] = []

    def start(self, image_tar: Path, count: int = 2) -> "OverlayLab":
        lab = self.lab
        sw = lab.netns("sw")
        lab.bridge(sw, "br0")
        lab.addr(sw, "br0", f"{ETCD_IP}/24")
        namespaces = []
        for n in range(1, count + 1):
            ns = lab.netns(f"h{n}")
            lab.veth(ns, "eth0", sw, f"p{n}")
            lab.enslave(sw, f"p{n}", "br0")
            lab.up(sw, f"p{n}")
            lab.addr(ns, "eth0", f"192.168.90.{n}/24")
            lab.up(ns, "eth0")
            namespaces.append(ns)
        self.etcd = EtcdServer(self.workdir / "etcd", netns=sw, address=ETCD_IP).start()
        for n, ns in enumerate(namespaces, 1):
            host = OverlayHost(lab, ns, n, self.etcd.url, self.workdir / f"host{n}")
            self.hosts.append(host)
            host.start(image_tar)
        return self

    def destroy(self) -> None:
        try:
            for host in self.hosts:
                host.destroy()
        finally:
            try:
                if self.etcd is not None:
                    self.etcd.destroy()
            finally:
                self.lab.destroy()

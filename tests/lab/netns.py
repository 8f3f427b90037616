"""Named network namespaces, veth cables and bridge "switches" for the emulated network.

A Lab owns every netns it creates (names ``nplab-<pid>-<n>-<role>``) and removes them all in
destroy(), which also works after a partial setup. Links are made with pyroute2 directly inside
the target namespaces (``IPRoute(netns=..., flags=0)``: never auto-create, never the root netns).
"""
from __future__ import annotations

import ctypes
import errno
import itertools
import os
from contextlib import contextmanager
from dataclasses import dataclass, field

from pyroute2 import IPRoute, NetlinkError
from pyroute2 import netns as pr_netns

from . import BUSYBOX, LAB_PREFIX, NETNS_DIR, register_cleanup, sh, wait_until

IFNAMSIZ = 15
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
_lab_ids = itertools.count()
_live_labs: list["Lab"] = []


def list_netns(prefix: str = LAB_PREFIX) -> list[str]:
    """Named network namespaces starting with ``prefix`` (by default: all of this process)."""
    try:
        return sorted(n for n in os.listdir(NETNS_DIR) if n.startswith(prefix))
    except FileNotFoundError:
        return []


def stale_netns() -> list[str]:
    """Lab namespaces (``nplab-<pid>-...``) whose creating process is gone: a killed run."""
    stale = []
    for name in list_netns("nplab-"):
        pid = name.split("-")[1]
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            stale.append(name)
    return stale


def remove_netns(name: str) -> None:
    """Idempotently remove the named netns (unmount + unlink). Only names with our prefix."""
    if not name.startswith("nplab-"):
        raise ValueError(f"refusing to remove netns {name!r}: not created by the lab")
    try:
        pr_netns.remove(name)
    except FileNotFoundError:
        pass


def _check_ifname(name: str) -> str:
    if not 0 < len(name) <= IFNAMSIZ:
        raise ValueError(f"interface name {name!r} must be 1..{IFNAMSIZ} characters")
    return name


@contextmanager
def entered(ns: str):
    """Run the block with this thread in netns ``ns`` (for code that acts on the current netns, like
    the plugin's driver; sockets opened inside stay in ``ns``, threads started inside inherit it)."""
    back = os.open("/proc/self/ns/net", os.O_RDONLY)
    target = os.open(os.path.join(NETNS_DIR, ns), os.O_RDONLY)
    try:
        if _libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {ns}")
        yield
    finally:
        if _libc.setns(back, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns back")
        os.close(back)
        os.close(target)


class Lab:
    """A set of network namespaces created by this process, destroyed together."""

    def __init__(self):
        self.prefix = f"{LAB_PREFIX}{next(_lab_ids)}-"
        self.namespaces: list[str] = []
        _live_labs.append(self)

    # -- namespaces --
    def netns(self, role: str) -> str:
        """Create netns ``<prefix><role>`` with lo up; returns its name."""
        name = self.prefix + role
        if os.path.exists(os.path.join(NETNS_DIR, name)):
            raise FileExistsError(f"netns {name} already exists")
        self.namespaces.append(name)  # registered first: destroy() copes with a half-made one
        pr_netns.create(name)
        self.up(name, "lo")
        return name

    def destroy(self) -> list[str]:
        """Remove every netns of this lab (links inside go with them); returns names still there."""
        errors = []
        for name in reversed(self.namespaces):
            try:
                remove_netns(name)
            except OSError as exc:
                errors.append(f"{name}: {exc}")
        self.namespaces.clear()
        if self in _live_labs:
            _live_labs.remove(self)
        left = list_netns(self.prefix)
        if errors or left:
            raise RuntimeError(f"lab teardown incomplete: {errors} {left}")
        return left

    # -- links --
    @contextmanager
    def ipr(self, ns: str):
        """An IPRoute bound to ``ns`` (which must exist; it is never created implicitly)."""
        if ns not in self.namespaces:
            raise ValueError(f"netns {ns!r} does not belong to this lab")
        with IPRoute(netns=ns, flags=0) as ipr:
            yield ipr

    def index(self, ns: str, ifname: str) -> int:
        with self.ipr(ns) as ipr:
            found = ipr.link_lookup(ifname=ifname)
        if not found:
            raise LookupError(f"no link {ifname} in {ns}")
        return found[0]

    def veth(self, ns_a: str, if_a: str, ns_b: str, if_b: str, *, mtu: int | None = None,
             up: bool = True) -> None:
        """A cable: veth ``if_a`` in ``ns_a`` <-> ``if_b`` in ``ns_b``."""
        _check_ifname(if_a), _check_ifname(if_b)
        if ns_b not in self.namespaces:
            raise ValueError(f"netns {ns_b!r} does not belong to this lab")
        with self.ipr(ns_a) as ipr:
            ipr.link("add", ifname=if_a, kind="veth", peer={"ifname": if_b, "net_ns_fd": ns_b})
        for ns, ifname in ((ns_a, if_a), (ns_b, if_b)):
            if mtu is not None:
                self.set(ns, ifname, mtu=mtu)
            if up:
                self.up(ns, ifname)

    def bridge(self, ns: str, name: str, *, up: bool = True) -> None:
        """A learning bridge without STP: the switch."""
        with self.ipr(ns) as ipr:
            ipr.link("add", ifname=_check_ifname(name), kind="bridge", br_stp_state=0)
        if up:
            self.up(ns, name)

    def enslave(self, ns: str, ifname: str, bridge: str) -> None:
        self.set(ns, ifname, master=self.index(ns, bridge))

    def set(self, ns: str, ifname: str, **attrs) -> None:
        """``ip link set`` with pyroute2 attributes (mtu=, state=, master=, address=...)."""
        idx = self.index(ns, ifname)
        with self.ipr(ns) as ipr:
            ipr.link("set", index=idx, **attrs)

    def up(self, ns: str, ifname: str) -> None:
        self.set(ns, ifname, state="up")

    def addr(self, ns: str, ifname: str, cidr: str) -> None:
        """Add ``cidr`` (e.g. 10.77.0.1/24) to ``ifname``; an existing address is fine."""
        address, prefixlen = cidr.split("/")
        idx = self.index(ns, ifname)
        with self.ipr(ns) as ipr:
            try:
                ipr.addr("add", index=idx, address=address, prefixlen=int(prefixlen))
            except NetlinkError as exc:
                if exc.code != errno.EEXIST:
                    raise

    def links(self, ns: str) -> dict[str, dict]:
        """{ifname: {index, mtu, state, kind, master, address}} for every link in ``ns``."""
        out = {}
        with self.ipr(ns) as ipr:
            for link in ipr.get_links():
                info = link.get_attr("IFLA_LINKINFO")
                out[link.get_attr("IFLA_IFNAME")] = {
                    "index": link["index"],
                    "mtu": link.get_attr("IFLA_MTU"),
                    "state": link.get_attr("IFLA_OPERSTATE"),
                    "up": bool(link["flags"] & 1),
                    "kind": info.get_attr("IFLA_INFO_KIND") if info else None,
                    "master": link.get_attr("IFLA_MASTER"),
                    "address": link.get_attr("IFLA_ADDRESS"),
                }
        return out

    def addresses(self, ns: str, ifname: str | None = None) -> list[str]:
        """IPv4 addresses (CIDR) in ``ns``, optionally only on ``ifname``."""
        with self.ipr(ns) as ipr:
            kw = {"index": self.index(ns, ifname)} if ifname else {}
            return [f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}"
                    for a in ipr.get_addr(family=2, **kw)]

    def delete_link(self, ns: str, ifname: str) -> None:
        """Idempotently delete ``ifname`` in ``ns``."""
        with self.ipr(ns) as ipr:
            try:
                ipr.link("del", ifname=ifname)
            except NetlinkError as exc:
                if exc.code not in (errno.ENODEV, errno.ENOENT):
                    raise

    # -- commands --
    def sh(self, ns: str, argv, **kw):
        """Run ``argv`` inside ``ns`` (see tests.lab.sh)."""
        if ns not in self.namespaces:
            raise ValueError(f"netns {ns!r} does not belong to this lab")
        return sh(argv, netns=ns, **kw)

    def ping(self, ns: str, dst: str, *, count: int = 1, wait: int = 1) -> bool:
        """True if ``dst`` answers ``count`` pings sent from ``ns`` (busybox ping)."""
        res = self.sh(ns, [BUSYBOX, "ping", "-c", count, "-W", wait, dst],
                      check=False, timeout=count * wait + 5)
        return res.returncode == 0

    def wait_ping(self, ns: str, dst: str, timeout: float = 5.0) -> None:
        """Wait until ``dst`` answers a ping from ``ns``; TimeoutError after ``timeout``."""
        wait_until(lambda: self.ping(ns, dst), timeout, f"{dst} to answer ping from {ns}",
                   interval=0.1)


def destroy_all_labs() -> None:
    """Last-resort cleanup (cleanup_all: session end, atexit): every netns of this process."""
    for lab in list(_live_labs):
        try:
            lab.destroy()
        except Exception:  # noqa: BLE001 - the sweep below retries
            pass
    for name in list_netns():
        remove_netns(name)


register_cleanup(2, destroy_all_labs)


# --- the emulated physical network -------------------------------------------------------------

@dataclass
class Physnet:
    """One L2 segment (a bridge in netns ``sw``) joining a router, a second host and the Docker
    host ``hosta`` (parents ``eth1``/``eth2``, no addresses). 10.77.0.0/24 only, no routes out."""
    lab: Lab
    sw: str
    router: str
    hostb: str
    hosta: str
    bridge: str = "br0"
    subnet: str = "10.77.0.0/24"
    prefixlen: int = 24
    gateway: str = "10.77.0.1"  # the router
    hostb_ip: str = "10.77.0.50"
    parent: str = "eth1"
    parent2: str = "eth2"
    baseline: dict = field(default_factory=dict)  # hosta links after build: {ifname: mtu}

    def ip(self, host: int) -> str:
        """10.77.0.<host>."""
        return f"10.77.0.{host}"

    def leaf_rates(self, dev: str = "eth1") -> list[int]:
        """Rates (bit/s, sorted) of netplugin's per-endpoint HTB classes (the leaves under 1:1) on hosta's ``dev``."""
        from netplugin.kernel.shaping import parse_rate
        out = self.lab.sh(self.hosta, ["tc", "class", "show", "dev", dev]).stdout
        return sorted(parse_rate(line.split(" rate ")[1].split()[0]) for line in out.splitlines()
                      if " parent 1:1 " in line)

    def restore_hosta(self) -> list[str]:
        """Undo what a test left in hosta: delete links that weren't there after build(), bring
        the parents back up with their MTU and without addresses. Returns the deleted names."""
        deleted = []
        links = self.lab.links(self.hosta)
        for name in links:
            if name not in self.baseline:
                self.lab.delete_link(self.hosta, name)
                deleted.append(name)
        for name in (self.parent, self.parent2):
            idx = self.lab.index(self.hosta, name)
            with self.lab.ipr(self.hosta) as ipr:
                ipr.flush_addr(index=idx)
                ipr.link("set", index=idx, state="up", mtu=self.baseline[name], master=0)
        return deleted


def build_physnet(lab: Lab) -> Physnet:
    """Create the emulated network inside ``lab``; on failure the caller destroys the lab."""
    net = Physnet(lab=lab, sw=lab.netns("sw"), router=lab.netns("router"),
                  hostb=lab.netns("hostb"), hosta=lab.netns("hosta"))
    lab.bridge(net.sw, net.bridge)
    cables = [(net.router, "eth0", "p-router"), (net.hostb, "eth0", "p-hostb"),
              (net.hosta, net.parent, "p-hosta1"), (net.hosta, net.parent2, "p-hosta2")]
    for ns, ifname, port in cables:
        lab.veth(ns, ifname, net.sw, port)
        lab.enslave(net.sw, port, net.bridge)
    lab.addr(net.router, "eth0", f"{net.gateway}/{net.prefixlen}")
    lab.addr(net.hostb, "eth0", f"{net.hostb_ip}/{net.prefixlen}")
    net.baseline = {name: info["mtu"] for name, info in lab.links(net.hosta).items()}
    return net

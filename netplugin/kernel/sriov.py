"""SR-IOV physical functions (PFs) and their virtual functions (VFs). No Docker terms here.

Discovery is sysfs: ``/sys/class/net/<PF>/device/`` has ``sriov_totalvfs``, ``sriov_numvfs`` and one
``virtfn<N>`` link per enabled VF, whose ``net/`` directory names the VF's netdev. sysfs lists only
the netdevs of the network namespace it was mounted in, so a VF whose netdev is inside a container
has an empty ``net/``: that is how "at home" and "away" are told apart.

VF settings (MAC, port VLAN, spoof check, trust, max tx rate) belong to the PF and are set through it
with netlink (IFLA_VFINFO_LIST), one attribute per request so a refusal names the setting.
"""
import errno
import logging
import os
import time

from pyroute2 import NetlinkError

from plugincore.errors import BackendError
from plugincore.run import CommandError, run
from . import links

log = logging.getLogger("netplugin.sriov")
SYSFS_NET = "/sys/class/net"  # tests point this at a fake tree
ZERO_MAC = "00:00:00:00:00:00"
HOME, AWAY, ABSENT = "home", "away", "absent"  # where a VF's netdev is, seen from this namespace


def _device(pf: str, *parts: str) -> str:
    return os.path.join(SYSFS_NET, pf, "device", *parts)


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def total_vfs(pf: str) -> int | None:
    """How many VFs ``pf`` supports; None if it is not an SR-IOV physical function."""
    return _read_int(_device(pf, "sriov_totalvfs"))


def num_vfs(pf: str) -> int:
    return _read_int(_device(pf, "sriov_numvfs")) or 0


def sysfs_ifindex(name: str) -> int | None:
    """The ifindex sysfs shows for ``name`` (sysfs lists the namespace it was mounted in)."""
    return _read_int(os.path.join(SYSFS_NET, name, "ifindex"))


def link_speed(pf: str) -> int | None:
    """The PF's link speed in Mbit/s, None when unknown (no carrier)."""
    speed = _read_int(os.path.join(SYSFS_NET, pf, "speed"))
    return speed if speed and speed > 0 else None


def has_carrier(pf: str) -> bool:
    return _read_int(os.path.join(SYSFS_NET, pf, "carrier")) == 1


def vf_pci(pf: str, vf: int) -> str:
    path = _device(pf, f"virtfn{vf}")
    return os.path.basename(os.path.realpath(path)) if os.path.lexists(path) else ""


def vf_netdev(pf: str, vf: int) -> str | None:
    """The VF's netdev name if it is in this network namespace."""
    try:
        found = sorted(os.listdir(_device(pf, f"virtfn{vf}", "net")))
    except OSError:
        return None
    return found[0] if found else None


def vf_location(pf: str, vf: int) -> str:
    """HOME: its netdev is here; AWAY: a driver drives it but the netdev is in another namespace (a
    container); ABSENT: no such VF, or no driver bound (no netdev anywhere)."""
    if vf_netdev(pf, vf) is not None:
        return HOME
    return AWAY if os.path.exists(_device(pf, f"virtfn{vf}", "driver")) else ABSENT


def _has_driver(pf: str, vf: int) -> bool:
    return os.path.exists(_device(pf, f"virtfn{vf}", "driver"))


def _wait(predicate, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def enable_vfs(pf: str, count: int, timeout: float = 60.0) -> None:
    """Enable ``count`` VFs on ``pf`` (sriov_numvfs must be 0) and wait for their netdevs.

    The order matters: enabling VFs resets the PF (its link drops for a moment), and a VF driver
    that probes meanwhile finds the PF "still in reset" and its VF without a link until it is reset
    again. So VF drivers are kept from probing (sriov_drivers_autoprobe=0) until the PF's link is
    back, then each VF is probed explicitly."""
    autoprobe = _device(pf, "sriov_drivers_autoprobe")
    before = _read_text(autoprobe)
    _write(autoprobe, "0", f"could not pause VF driver probing on PF {pf}", missing_ok=True)
    try:
        _write(_device(pf, "sriov_numvfs"), str(count), f"could not enable {count} VFs on PF {pf} "
               "(sriov_numvfs)")
        if not _wait(lambda: all(os.path.lexists(_device(pf, f"virtfn{vf}")) for vf in range(count)),
                     timeout):
            raise BackendError(f"PF {pf} did not create its {count} VFs within {timeout:.0f}s")
        if not _wait(lambda: has_carrier(pf), 10.0, 0.1):  # no peer on the wire: probe anyway
            log.warning("PF %s has no carrier after enabling VFs; probing them anyway", pf)
    finally:
        if before:
            _write(autoprobe, before, f"could not restore VF driver probing on PF {pf}", missing_ok=True)
    bind_vf_drivers(pf, range(count), timeout, settle=0)  # nothing autoprobed them
    log.info("enabled %d VFs on PF %s", count, pf)


def _write(path: str, value: str, what: str, missing_ok: bool = False) -> None:
    try:
        with open(path, "w") as f:
            f.write(value)
    except FileNotFoundError:
        if not missing_ok:
            raise BackendError(f"{what}: {path} does not exist") from None
    except OSError as exc:
        raise BackendError(f"{what}: {exc.strerror or exc}") from None


def disable_vfs(pf: str) -> None:
    try:
        with open(_device(pf, "sriov_numvfs"), "w") as f:
            f.write("0")
    except OSError as exc:
        raise BackendError(f"could not disable the VFs of PF {pf}: {exc.strerror or exc}") from None
    log.info("disabled the VFs of PF %s", pf)


def bind_vf_drivers(pf: str, vfs, timeout: float = 60.0, settle: float = 1.0) -> None:
    """Make sure every VF in ``vfs`` is driven (has a netdev somewhere). Without udev nothing loads the
    VF driver for new PCI devices (igb's VFs need igbvf): load it by the VFs' modalias, as udev would,
    and probe each VF. ``settle``: how long to give the kernel's own autoprobe first."""
    unbound = [vf for vf in vfs if not _has_driver(pf, vf)]
    if not unbound or (settle and _wait(lambda: all(_has_driver(pf, vf) for vf in unbound), settle)):
        return
    aliases = {_read_text(_device(pf, f"virtfn{vf}", "modalias")) for vf in unbound} - {""}
    for alias in sorted(aliases):
        try:
            run(["modprobe", "-q", alias], timeout=60)
        except CommandError as exc:
            raise BackendError(f"no driver for the VFs of PF {pf} (modprobe {alias}): {exc}") from None
    for vf in unbound:  # a driver loaded earlier does not look at devices that appeared since
        if not _has_driver(pf, vf):
            _probe(vf_pci(pf, vf))
    if not _wait(lambda: all(_has_driver(pf, vf) for vf in unbound), timeout):
        missing = [vf for vf in unbound if not _has_driver(pf, vf)]
        raise BackendError(f"VFs {missing} of PF {pf} have no driver after loading and probing it")


def _probe(pci_address: str) -> None:
    """Ask the PCI core to bind a driver to one device (what udev's coldplug amounts to)."""
    if not pci_address:
        return
    try:
        with open("/sys/bus/pci/drivers_probe", "w") as f:
            f.write(pci_address)
    except OSError as exc:  # ENODEV/EINVAL: no driver matches (yet); the wait below reports it
        log.debug("probing %s: %s", pci_address, exc.strerror or exc)


def _read_text(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


# ---- VF settings through the PF (netlink) ----

def vf_settings(ipr, pf_index: int) -> dict[int, dict]:
    """The PF's view of its VFs: {vf: {mac, vlan, qos, max_tx_rate, spoofchk, trust}}."""
    msg = ipr.link("get", index=pf_index, ext_mask=1)[0]  # RTEXT_FILTER_VF
    found = {}
    vflist = msg.get("IFLA_VFINFO_LIST")
    for info in (vflist.get_attrs("IFLA_VF_INFO") if vflist is not None else []):
        mac = info.get("IFLA_VF_MAC") or {}
        if "vf" not in mac:
            continue
        vlan = info.get("IFLA_VF_VLAN") or {}
        rate = info.get("IFLA_VF_RATE") or {}
        spoof = info.get("IFLA_VF_SPOOFCHK") or {}
        trust = info.get("IFLA_VF_TRUST") or {}
        found[mac["vf"]] = {"mac": mac.get("mac", ZERO_MAC), "vlan": vlan.get("vlan", 0),
                            "qos": vlan.get("qos", 0), "max_tx_rate": rate.get("max_tx_rate", 0),
                            "spoofchk": spoof.get("spoofchk"), "trust": trust.get("trust")}
    return found


def _set_vf(ipr, pf: links.LinkInfo, vf: int, what: str, spec: dict, optional: bool = False) -> bool:
    """One VF attribute through the PF. ``optional``: a driver without the feature is only logged."""
    try:
        ipr.link("set", index=pf.index, vf={"vf": vf, **spec})
        return True
    except NetlinkError as exc:
        if optional and exc.code == errno.EOPNOTSUPP:
            log.warning("PF %s does not support %s for its VFs", pf.name, what)
            return False
        hint = ""
        if what == "max tx rate" and exc.code == errno.EINVAL:
            hint = f" (link down, or above the link speed {link_speed(pf.name) or 'unknown'} Mbit/s?)"
        raise BackendError(f"PF {pf.name} refused {what} for VF {vf}: "
                           f"{os.strerror(exc.code)}{hint}") from None


def configure_vf(ipr, pf: links.LinkInfo, vf: int, *, mac: str, vlan: int, max_tx_rate: int,
                 spoofchk: bool = True, trust: bool = False, carrier_timeout: float = 10.0) -> None:
    """Set what differs from the PF's current view of ``vf`` (each setting is idempotent)."""
    now = vf_settings(ipr, pf.index).get(vf, {})
    if now.get("mac", "").lower() != mac.lower():
        _set_vf(ipr, pf, vf, "MAC " + mac, {"mac": mac})
    if now.get("vlan", 0) != vlan or now.get("qos", 0):
        _set_vf(ipr, pf, vf, f"VLAN {vlan}", {"vlan": {"vlan": vlan, "qos": 0}})
    if now.get("spoofchk") != int(spoofchk):
        _set_vf(ipr, pf, vf, "spoof checking", {"spoofchk": int(spoofchk)}, optional=True)
    if now.get("trust") != int(trust):
        _set_vf(ipr, pf, vf, "trust", {"trust": int(trust)}, optional=not trust)
    if now.get("max_tx_rate", 0) != max_tx_rate:
        # Rate limits need the PF's link (igb refuses them while the link is down, e.g. just after
        # enabling VFs reset the PF).
        _wait(lambda: has_carrier(pf.name), carrier_timeout, 0.1)
        _set_vf(ipr, pf, vf, "max tx rate", {"rate": {"min_tx_rate": 0, "max_tx_rate": max_tx_rate}},
                optional=max_tx_rate == 0)


NEUTRAL = {"mac": ZERO_MAC, "vlan": 0, "max_tx_rate": 0, "spoofchk": 1, "trust": 0}


def is_neutral(settings: dict) -> bool:
    """True when a VF's settings (one entry of vf_settings) are what reset_vf leaves."""
    return all(settings.get(key, neutral) in (neutral, None) for key, neutral in NEUTRAL.items())


def reset_vf(ipr, pf: links.LinkInfo, vf: int) -> list[str]:
    """Back to neutral (no MAC, VLAN 0, no rate limit, spoof check on, trust off), changing only what
    differs. Best effort: returns what could not be reset, so a release never fails half-way."""
    now = vf_settings(ipr, pf.index).get(vf, {})
    problems = []
    for what, key, neutral, spec in (
            ("MAC", "mac", ZERO_MAC, {"mac": ZERO_MAC}),
            ("VLAN", "vlan", 0, {"vlan": {"vlan": 0, "qos": 0}}),
            ("max tx rate", "max_tx_rate", 0, {"rate": {"min_tx_rate": 0, "max_tx_rate": 0}}),
            ("spoof checking", "spoofchk", 1, {"spoofchk": 1}),
            ("trust", "trust", 0, {"trust": 0})):
        if now.get(key, neutral) in (neutral, None):
            continue
        try:
            _set_vf(ipr, pf, vf, what, spec, optional=True)
        except BackendError as exc:
            problems.append(str(exc))
    return problems


# ---- the VF's netdev ----

def prepare_netdev(ipr, name: str, *, mtu: int, mac: str) -> links.LinkInfo:
    """Get the VF netdev ready to be moved into a container: down, with the MTU, and carrying the MAC
    the PF assigned. A VF driver adopts an administratively set MAC only when the VF resets (igbvf:
    on close), and refuses to change it itself afterwards unless trusted; one up/down cycle makes it
    adopt it, so Docker's later "set MAC" (the same address) succeeds."""
    link = links.get_link(ipr, name)
    if link is None:
        raise BackendError(f"VF netdev {name} disappeared")
    ipr.link("set", index=link.index, state="up")
    ipr.link("set", index=link.index, state="down")
    if link.mtu != mtu:
        ipr.link("set", index=link.index, mtu=mtu)
    link = links.get_link_by_index(ipr, link.index)
    if link.mac.lower() != mac.lower():
        try:  # drivers that take the MAC from the VF side
            ipr.link("set", index=link.index, address=mac)
        except NetlinkError as exc:
            raise BackendError(f"VF netdev {name} did not take MAC {mac}: {os.strerror(exc.code)}") from None
        link = links.get_link_by_index(ipr, link.index)
    return link


def park_netdev(ipr, name: str, original: str) -> str:
    """A released VF's netdev: down, and back under its original name if it came home renamed (a
    container's ``eth0``, or ``dev<N>`` when the kernel returned it from a dead namespace)."""
    link = links.get_link(ipr, name)
    if link is None:
        return name
    if link.up:
        ipr.link("set", index=link.index, state="down")
    if original and name != original and links.get_link(ipr, original) is None:
        try:
            ipr.link("set", index=link.index, ifname=original)
            return original
        except NetlinkError as exc:
            log.warning("could not rename VF netdev %s back to %s: %s", name, original, os.strerror(exc.code))
    return name

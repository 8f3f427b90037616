"""Per-endpoint bandwidth limits: HTB classes chosen by source address, and TBF on host veths.

Egress (what a container sends out of the host) is shaped on the network's egress device (the NIC,
VLAN or VXLAN device the bridge forwards to) without any tc filter:

* an HTB root qdisc ``1:`` with ``default 0xffff``, a class that never exists, so unclassified
  traffic takes HTB's direct queue and is not shaped; a class ``1:1`` at 100gbit; one leaf
  ``1:<minor>`` per shaped endpoint, rate = ceil = its limit;
* an ipset ``hash:ip skbinfo`` mapping each shaped IPv4 address to ``skbprio 1:<minor>``;
* ONE mangle rule in a chain of ours hooked from POSTROUTING: ``-m set --match-set S src -j SET
  --map-set S src --map-prio``. br_netfilter runs mangle POSTROUTING for bridged IPv4 frames, the
  SET target writes skb->priority, and HTB takes a priority naming one of its leaves as the class.

Per packet that is one hash lookup whatever the number of shaped endpoints. A leaf keeps HTB's
default child (pfifo, limit txqueuelen; fq_codel and sfq are not built on every kernel): iperf3 gets
95% of the rate from 10mbit to 3gbit (HTB counts whole frames). A rate change is a live ``change``
of the class. Ingress (traffic to a container) is a TBF root qdisc on its host-side veth (its egress
is the container's ingress); a new rate replaces it, dropping what it queued (50 ms at most).

Rates are bits/s at byte/s resolution (the kernel keeps bytes/s); minors (0x10..0xfffe) are the
caller's to allocate. All functions are idempotent; ``ensure_*`` read first and write what differs.
"""
import errno
import ipaddress
import os
import re
import time

from pyroute2 import NetlinkError
from pyroute2.netlink import NLM_F_ACK, NLM_F_ECHO, NLM_F_REQUEST
from pyroute2.netlink.rtnl import RTM_GETQDISC, RTM_GETTCLASS, TC_H_ROOT
from pyroute2.netlink.rtnl.tcmsg import tcmsg

from plugincore.errors import BackendError, InvalidRequest
from plugincore.run import CommandError, run
from . import links

SET_NAME = "netplugin-shape"
CHAIN = "NETPLUGIN-SHAPE"
MIN_RATE, MAX_RATE = 8_000, 100_000_000_000
MINOR_MIN, MINOR_MAX = 0x10, 0xFFFE
ROOT, TOP, NO_CLASS = 0x10000, 0x10001, 0xFFFF  # 1:, 1:1, the default class that is never made
TBF_MAX = (1 << 32) - 1  # bytes/s: pyroute2 has no TCA_TBF_RATE64 (~34 Gbit/s)
RULE = f"-A {CHAIN} -m set --match-set {SET_NAME} src -j SET --map-set {SET_NAME} src --map-prio"
JUMP = f"-A POSTROUTING -j {CHAIN}"
RESTORE = ["iptables-restore", "-w", "--noflush"]
_UNITS = {"": 1, "bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9}
_RATE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*")


# ---- rates ---------------------------------------------------------------------------------------

def parse_rate(text: str, what: str = "egress") -> int:
    """Bits/s from tc's notation: ``500kbit``, ``50mbit``, ``1.5gbit``, ``800000bit``; a plain number
    is bit/s as in tc. Units are decimal and case-insensitive; 8kbit..100gbit."""
    match = _RATE.fullmatch(str(text).lower())
    if not match or match.group(2) not in _UNITS:
        raise InvalidRequest(f"{what} '{text}' is not a rate like 50mbit (units kbit, mbit, gbit)")
    bits = round(float(match.group(1)) * _UNITS[match.group(2)])
    if not MIN_RATE <= bits <= MAX_RATE:
        raise InvalidRequest(f"{what} '{text}' is out of range (8kbit to 100gbit)")
    return bits


def format_rate(bits: int) -> str:
    """The shortest exact tc spelling: 50000000 -> "50mbit", 1500000000 -> "1500mbit"."""
    unit = next((u for u in ("gbit", "mbit", "kbit") if bits and bits % _UNITS[u] == 0), "bit")
    return f"{bits // _UNITS[unit]}{unit}"


def _check_rate(rate: int) -> int:
    if not isinstance(rate, int) or not MIN_RATE <= rate <= MAX_RATE:
        raise InvalidRequest(f"rate {rate!r} is not between 8kbit and 100gbit (bits/s)")
    return rate // 8


def _check_minor(minor: int) -> int:
    if not isinstance(minor, int) or not MINOR_MIN <= minor <= MINOR_MAX:
        raise InvalidRequest(f"class minor {minor!r} is not in 0x10..0xfffe")
    return minor


def _ipv4(address: str) -> str:
    try:
        return str(ipaddress.IPv4Address(address))
    except ValueError:
        raise InvalidRequest(f"egress shaping needs an IPv4 address, not {address!r}") from None


# ---- the classifier: ipset + one mangle rule -----------------------------------------------------

def _ipset(*args: str, busy_ok: bool = False):
    """``ipset args``; None (not an error) if the set does not exist, or with ``busy_ok`` if it is in
    use by a kernel component."""
    proc = run(["ipset", *args], timeout=30, check=False)
    if proc.returncode == 0:
        return proc
    if "does not exist" in proc.stderr or (busy_ok and "in use" in proc.stderr):
        return None
    raise CommandError(["ipset", *args], proc.returncode, proc.stderr)


def _members() -> dict[str, int | None] | None:
    """{address: minor} of the set (None for a priority outside 1:), None when there is no set."""
    proc = _ipset("save", SET_NAME)
    if proc is None:
        return None
    found = {}
    for parts in (line.split() for line in proc.stdout.splitlines()):
        if parts[:1] == ["add"] and len(parts) >= 3:
            prio = parts[parts.index("skbprio") + 1] if "skbprio" in parts else ""
            major, _, minor = prio.partition(":")
            found[parts[2]] = int(minor, 16) if major == "1" and minor else None
    return found


def _set_batch(lines: list[str]) -> None:
    """One ``ipset -exist restore``: creates the set if needed, then ``lines``."""
    create = f"create {SET_NAME} hash:ip family inet maxelem 65536 skbinfo"
    run(["ipset", "-exist", "restore"], input="\n".join([create, *lines]) + "\n", timeout=60)


def _mangle() -> tuple[bool, list[str], int]:
    """(our chain exists, its rules, number of POSTROUTING jumps to it)."""
    lines = run(["iptables", "-w", "-t", "mangle", "-S"], timeout=20).stdout.splitlines()
    return f"-N {CHAIN}" in lines, [x for x in lines if x.startswith(f"-A {CHAIN} ")], lines.count(JUMP)


BRIDGE_NF = "/proc/sys/net/bridge/bridge-nf-call-iptables"


def _ensure_bridge_netfilter() -> None:
    """Bridged frames reach the mangle rule only through br_netfilter: load it if absent (Docker's
    own bridge driver does the same); refuse when it is switched off rather than shape nothing."""
    if not os.path.exists(BRIDGE_NF):
        try:
            run(["modprobe", "br_netfilter"], timeout=30)
        except CommandError as exc:
            raise BackendError(f"rate limits need br_netfilter (bridged packets must pass iptables): {exc}") from None
    with open(BRIDGE_NF) as f:
        if f.read().strip() != "1":
            raise BackendError("rate limits need net.bridge.bridge-nf-call-iptables = 1 (bridged packets "
                               "must pass iptables to be classified); it is 0 in the plugin's namespace")


def ensure_classifier() -> bool:
    """The set, our mangle chain holding just the one rule, one jump to it first in POSTROUTING.
    Reads first; True if something had to be written (the chain in one iptables-restore batch)."""
    _ensure_bridge_netfilter()
    wrote = _ipset("-n", "list", SET_NAME) is None
    if wrote:
        _set_batch([])
    chain, rules, jumps = _mangle()
    if chain and rules == [RULE] and jumps == 1:
        return wrote
    batch = [f":{CHAIN} - [0:0]", RULE]  # the chain line creates or flushes just our chain
    batch += [f"-I POSTROUTING 1 -j {CHAIN}"] if jumps == 0 else [f"-D POSTROUTING -j {CHAIN}"] * (jumps - 1)
    run(RESTORE, input="\n".join(["*mangle", *batch, "COMMIT\n"]), timeout=20)
    return True


def classifier_present() -> bool:
    """Whether any part of the classifier (set, chain, jump) exists."""
    chain, _, jumps = _mangle()
    return chain or jumps > 0 or _members() is not None


def remove_classifier(force: bool = False) -> bool:
    """Remove jump, chain and set; while the set has members only with ``force`` (False: kept)."""
    members = _members()
    if members and not force:
        return False
    chain, _, jumps = _mangle()
    if chain or jumps:
        batch = [f"-D POSTROUTING -j {CHAIN}"] * jumps + [f":{CHAIN} - [0:0]", f"-X {CHAIN}"] * chain
        run(RESTORE, input="\n".join(["*mangle", *batch, "COMMIT\n"]), timeout=20)
    deadline = time.monotonic() + 5  # the rule's hold on the set may outlive the commit a moment
    while members is not None and _ipset("-n", "list", SET_NAME) is not None:
        if _ipset("destroy", SET_NAME, busy_ok=time.monotonic() < deadline) is None:
            time.sleep(0.05)
    return True


def entries() -> dict[str, int | None]:
    """The set's members {address: minor} ({} when there is no set)."""
    return _members() or {}


def set_entries(wanted: dict[str, int]) -> dict:
    """Make the set's members exactly ``wanted`` {address: minor}: one ``ipset restore`` batch of the
    differences (none if there are none); creates the set if needed."""
    want = {_ipv4(address): _check_minor(minor) for address, minor in wanted.items()}
    have = _members() or {}
    adds = [f"add {SET_NAME} {a} skbprio 1:{m:x}" for a, m in want.items() if have.get(a, -1) != m]
    stale = [f"del {SET_NAME} {a}" for a in have if a not in want]
    if adds or stale:
        _set_batch(adds + stale)
    added = sum(a not in have for a in want)
    return {"added": added, "changed": len(adds) - added, "removed": len(stale)}


def add_entry(address: str, minor: int) -> None:
    """``address`` -> class 1:<minor>, replacing the class of an address already there."""
    _set_batch([f"add {SET_NAME} {_ipv4(address)} skbprio 1:{_check_minor(minor):x}"])


def remove_entry(address: str) -> None:
    _ipset("-exist", "del", SET_NAME, _ipv4(address))


# ---- tc over netlink -----------------------------------------------------------------------------

def _root(ipr, dev: str, missing_ok: bool = True):
    """(index, root qdisc message or None) of ``dev``; (None, None) if there is no such device."""
    link = links.get_link(ipr, dev)
    if link is None:
        if not missing_ok:
            raise BackendError(f"cannot shape {dev}: no such device")
        return None, None
    # One RTM_GETQDISC for this device's root: a dump (get_qdiscs) returns every link's qdiscs and costs
    # ~0.1 ms per link to parse, which made each Join and rate change grow with the host's endpoints.
    msg = tcmsg()
    msg["index"], msg["parent"] = link.index, TC_H_ROOT
    msg["header"]["type"] = RTM_GETQDISC
    msg["header"]["flags"] = NLM_F_REQUEST | NLM_F_ACK | NLM_F_ECHO
    try:
        roots = [m for m in ipr.nlm_request_batch([msg]) if m.get_attr("TCA_KIND")]
    except NetlinkError as exc:
        if exc.code in (errno.ENOENT, errno.EINVAL):
            return link.index, None
        raise BackendError(f"cannot read the root qdisc of {dev}: {exc}") from exc
    return link.index, (roots[0] if roots else None)


def _options(msg, name: str):
    options = msg.get_attr("TCA_OPTIONS")
    return None if options is None else options.get_attr(name)


def _kind(msg) -> str | None:
    return None if msg is None else msg.get_attr("TCA_KIND")


def _is_ours(msg) -> bool:
    """Whether root qdisc ``msg`` is our htb: handle 1:, default class 0xffff."""
    init = _options(msg, "TCA_HTB_INIT") if _kind(msg) == "htb" and msg["handle"] == ROOT else None
    return init is not None and init["defcls"] == NO_CLASS


def _refuse_foreign(msg, dev: str, ours: str) -> None:
    """Only a kernel default root qdisc (handle 0:: noqueue, pfifo_fast, mq, fq_codel, ...) may be
    replaced; any other is somebody's traffic control."""
    if msg is not None and msg["handle"] != 0:
        raise BackendError(f"{dev} already has a {_kind(msg)} root qdisc {msg['handle'] >> 16:x}: that "
                           f"netplugin did not create: not replacing it with {ours}")


def _tc(ipr, dev: str, command: str, kind: str | None, index: int, handle: int, **kwargs) -> bool:
    """One tc request; True if done, False if deleting what is already gone. A delete goes without a
    kind: with one, pyroute2 would encode (and demand) the kind's parameters."""
    try:
        ipr.tc(command, kind, index, handle, **kwargs)
        return True
    except NetlinkError as exc:
        if command.startswith("del") and exc.code in (errno.ENOENT, errno.ENODEV):
            return False
        raise BackendError(f"{dev}: tc {command} {kind or ''} {handle >> 16:x}:{handle & 0xFFFF:x} "
                           f"failed: {exc}") from exc


def _get_class(ipr, index: int, handle: int):
    """One class's message or None: a single RTM_GETTCLASS (answered only with NLM_F_ECHO) instead
    of parsing a dump of every class on the device (~60 ms at 1,000 classes)."""
    msg = tcmsg()
    msg["index"], msg["handle"] = index, handle
    msg["header"]["type"] = RTM_GETTCLASS
    msg["header"]["flags"] = NLM_F_REQUEST | NLM_F_ACK | NLM_F_ECHO
    try:
        return next((m for m in ipr.nlm_request_batch([msg]) if m.get_attr("TCA_KIND")), None)
    except NetlinkError as exc:
        if exc.code == errno.ENOENT:
            return None
        raise BackendError(f"cannot read class {handle >> 16:x}:{handle & 0xFFFF:x}: {exc}") from exc


def _class_args(rate_bytes: int) -> dict:
    # explicit quantum: rate/r2q kept within 1514..200000 bytes (no "quantum of class is big" warning)
    return {"rate": rate_bytes, "ceil": rate_bytes, "quantum": min(max(rate_bytes // 10, 1514), 200000)}


def _class_rate(msg) -> int:
    """Bytes/s of an HTB class message."""
    return _options(msg, "TCA_HTB_RATE64") or _options(msg, "TCA_HTB_PARMS")["rate"]


def ensure_htb(ipr, dev: str) -> bool:
    """HTB root ``1:`` (default 0xffff) with class 1:1 on ``dev``, replacing only a kernel default
    root qdisc. True if something was written."""
    index, root = _root(ipr, dev, missing_ok=False)
    wrote = False
    if not _is_ours(root):
        _refuse_foreign(root, dev, "an htb")
        wrote = _tc(ipr, dev, "replace", "htb", index, ROOT, parent=TC_H_ROOT, default=NO_CLASS)
    if _get_class(ipr, index, TOP) is None:
        wrote = _tc(ipr, dev, "add-class", "htb", index, TOP, parent=ROOT, **_class_args(MAX_RATE // 8))
    return wrote


def remove_htb(ipr, dev: str) -> bool:
    """Delete our root HTB of ``dev`` with all its classes (the kernel default comes back). False if
    it is not there; another root qdisc is left alone."""
    index, root = _root(ipr, dev)
    return _is_ours(root) and _tc(ipr, dev, "del", None, index, ROOT, parent=TC_H_ROOT)


def classes(ipr, dev: str) -> dict[int, int]:
    """{minor: bits/s} of the leaf classes under 1:1 of our HTB on ``dev`` ({} if there is none)."""
    index, root = _root(ipr, dev)
    if not _is_ours(root):
        return {}
    return {m["handle"] - ROOT: _class_rate(m) * 8 for m in ipr.get_classes(index=index)
            if m["index"] == index and m["parent"] == TOP and MINOR_MIN <= m["handle"] - ROOT <= MINOR_MAX}


def ensure_class(ipr, dev: str, minor: int, rate: int) -> bool:
    """Leaf 1:<minor> under 1:1 with rate = ceil = ``rate`` bits/s; an existing one is changed in
    place (nothing dropped). Needs ``ensure_htb``. True if something was written."""
    _check_minor(minor)
    rate_bytes = _check_rate(rate)
    index, root = _root(ipr, dev, missing_ok=False)
    if not _is_ours(root):
        raise BackendError(f"{dev} has no netplugin shaping qdisc (htb 1:) to add class 1:{minor:x} to")
    current = _get_class(ipr, index, ROOT | minor)
    if current is not None and current["parent"] == TOP and _class_rate(current) == rate_bytes:
        return False
    if current is not None and current["parent"] != TOP:  # not one of ours: start over
        _tc(ipr, dev, "del-class", None, index, ROOT | minor, parent=current["parent"])
        current = None
    command = "add-class" if current is None else "change-class"
    return _tc(ipr, dev, command, "htb", index, ROOT | minor, parent=TOP, **_class_args(rate_bytes))


def remove_class(ipr, dev: str, minor: int) -> bool:
    """Delete leaf 1:<minor> of our HTB on ``dev``; False if it (or the HTB, or the device) is gone."""
    _check_minor(minor)
    index, root = _root(ipr, dev)
    return _is_ours(root) and _tc(ipr, dev, "del-class", None, index, ROOT | minor, parent=TOP)


# ---- ingress: TBF on the host-side veth ----------------------------------------------------------

def ingress_limit(ipr, dev: str) -> int | None:
    """The bits/s of the TBF root qdisc of ``dev``, None if there is none."""
    _, root = _root(ipr, dev)
    return _options(root, "TCA_TBF_PARMS")["rate"] * 8 if _kind(root) == "tbf" else None


def ensure_ingress_limit(ipr, dev: str, rate: int) -> bool:
    """A TBF root qdisc limiting what ``dev`` sends (the container's ingress) to ``rate`` bits/s; a
    different rate is replaced. True if something was written."""
    rate_bytes = _check_rate(rate)
    if rate_bytes > TBF_MAX:
        raise InvalidRequest(f"ingress limit {format_rate(rate)} is more than tbf takes (34gbit)")
    index, root = _root(ipr, dev, missing_ok=False)
    if _kind(root) == "tbf" and _options(root, "TCA_TBF_PARMS")["rate"] == rate_bytes:
        return False
    _refuse_foreign(None if _kind(root) == "tbf" else root, dev, "a tbf")
    # burst: 10 ms at the rate, at least 16 KiB; queue: 50 ms (iperf3 gets 95%, 10mbit to 3gbit)
    return _tc(ipr, dev, "replace", "tbf", index, root["handle"] if _kind(root) == "tbf" else ROOT,
               parent=TC_H_ROOT, rate=rate_bytes, burst=max(rate_bytes // 100, 16384), latency="50ms")


def remove_ingress_limit(ipr, dev: str) -> bool:
    """Delete the TBF root qdisc of ``dev``; False if there is none (or no device)."""
    index, root = _root(ipr, dev)
    return _kind(root) == "tbf" and _tc(ipr, dev, "del", None, index, root["handle"], parent=TC_H_ROOT)

"""Does this kernel do what netplugin needs? Each feature is tried for real, with the product's own code
where it has some (links, HTB class, TBF, the ipset + mangle classifier), in a network namespace of this
process's own: the kernel removes it with everything made in it when the process ends, so nothing is
left behind even if it is killed, and no real interface, rule or set is ever touched.

Run as ``python -m netplugin.kernel.probe`` (netplugin doctor does, with a timeout); prints one JSON
object {feature: null if it works, else the error}. Module autoloading happens as it would for the
plugin (the kernel's request_module when a link kind or qdisc is first used; modprobe br_netfilter).
"""
import ctypes
import json
import sys

CLONE_NEWNET = 0x40000000
FEATURES = ("veth", "bridge", "vlan", "vxlan", "htb", "tbf", "classifier")


def _unshare_net() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"unshare(CLONE_NEWNET) failed: {__import__('os').strerror(errno)}")


def _try(results: dict, feature: str, fn) -> bool:
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - the error is the finding
        results[feature] = f"{type(exc).__name__}: {exc}"
        return False
    results[feature] = None
    return True


def probe() -> dict:
    """{feature: None or error text}; call only in a throwaway network namespace."""
    from pyroute2 import IPRoute

    from . import shaping

    results: dict = {}
    with IPRoute() as ipr:
        def index(name):
            return ipr.link_lookup(ifname=name)[0]

        veth = _try(results, "veth", lambda: ipr.link("add", ifname="npprobe0", kind="veth",
                                                      peer={"ifname": "npprobe1"}))
        bridge = _try(results, "bridge", lambda: ipr.link("add", ifname="npprobebr", kind="bridge"))
        if veth and bridge:
            ipr.link("set", index=index("npprobe0"), master=index("npprobebr"))
        parent = "npprobe0" if veth else "npprobebr" if bridge else None
        if parent is None:
            results["vlan"] = "no link to put a VLAN on (neither veth nor bridge works)"
        else:
            _try(results, "vlan", lambda: ipr.link("add", ifname="npprobe.100", kind="vlan",
                                                   link=index(parent), vlan_id=100))
        _try(results, "vxlan", lambda: ipr.link("add", ifname="npprobevx", kind="vxlan", vxlan_id=42,
                                                vxlan_port=4789, vxlan_learning=0))
        if veth:
            for name in ("npprobe0", "npprobe1"):
                ipr.link("set", index=index(name), state="up")
            _try(results, "htb", lambda: (shaping.ensure_htb(ipr, "npprobe0"),
                                          shaping.ensure_class(ipr, "npprobe0", 0x10, 10_000_000)))
            _try(results, "tbf", lambda: shaping.ensure_ingress_limit(ipr, "npprobe1", 10_000_000))
        else:
            results["htb"] = results["tbf"] = "no veth to add a qdisc to"
        # ipset (hash:ip skbinfo), the mangle chain with the SET --map-prio rule, br_netfilter
        _try(results, "classifier", lambda: (shaping.ensure_classifier(), shaping.add_entry("10.0.0.1", 0x10)))
    return results


def main() -> int:
    try:
        _unshare_net()
    except OSError as exc:
        json.dump({"error": str(exc)}, sys.stdout)
        return 1
    json.dump(probe(), sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())

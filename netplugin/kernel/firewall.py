"""Filter rules that keep traffic on the plugin's own bridges flowing.

br_netfilter makes bridged frames traverse iptables FORWARD, where Docker sets the policy to DROP.
All our rules live in one chain of our own, rebuilt from state in one ``iptables-restore --noflush``
batch (the ``:CHAIN`` line flushes just that chain), plus one jump from FORWARD. Nothing NATs.
"""
import logging
import shutil

from plugincore.run import CommandError, run

log = logging.getLogger("netplugin.firewall")
CHAIN = "NETPLUGIN-FORWARD"
TOOLS = (("iptables", "iptables-restore"), ("ip6tables", "ip6tables-restore"))


def _chain_batch(bridges: list[str]) -> str:
    lines = ["*filter", f":{CHAIN} - [0:0]"]
    for bridge in sorted(bridges):
        # Bridged frames carry the bridge as both in and out device (the ports are physdev-*).
        lines.append(f"-A {CHAIN} -i {bridge} -o {bridge} -j ACCEPT")
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def _has_jump(iptables: str) -> bool:
    try:
        run([iptables, "-w", "-C", "FORWARD", "-j", CHAIN], timeout=10)
        return True
    except CommandError as exc:
        if exc.returncode == 1 or "No chain" in exc.stderr or "does not exist" in exc.stderr:
            return False
        raise


def _chain_exists(iptables: str) -> bool:
    return run([iptables, "-w", "-S", CHAIN], timeout=10, check=False).returncode == 0


def sync_forward_rules(bridges: list[str]) -> None:
    """Make FORWARD accept traffic within exactly ``bridges``; with none, remove our chain and jump."""
    for iptables, restore in TOOLS:
        if shutil.which(iptables) is None:
            if iptables == "iptables":
                log.warning("iptables is not installed: bridged traffic may be dropped by br_netfilter")
            continue
        if bridges:
            run([restore, "-w", "--noflush"], input=_chain_batch(bridges), timeout=20)
            if not _has_jump(iptables):
                # First in FORWARD: later DROP rules (Docker's isolation chains) must not see our traffic.
                run([iptables, "-w", "-I", "FORWARD", "1", "-j", CHAIN], timeout=10)
        else:
            while _has_jump(iptables):
                run([iptables, "-w", "-D", "FORWARD", "-j", CHAIN], timeout=10)
            if _chain_exists(iptables):
                run([iptables, "-w", "-F", CHAIN], timeout=10)
                run([iptables, "-w", "-X", CHAIN], timeout=10)


def forward_rules(iptables: str = "iptables") -> list[str]:
    """Our chain's rules as ``iptables -S`` prints them (for status and tests)."""
    proc = run([iptables, "-w", "-S", CHAIN], timeout=10, check=False)
    return [line for line in proc.stdout.splitlines() if line.startswith("-A")]

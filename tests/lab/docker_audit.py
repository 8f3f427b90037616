"""The audit of the torture through a real dockerd (tests/lab/docker_torture.py): Docker's view against
both plugins' state, the Docker host's kernel (tests.lab.audit), this host's mounts and the RBD pool
(tests.lab.volaudit), and the running containers themselves (a ping on each address, every token in their
volume). What only a cut-off request explains is counted apart within the budget of the kills during
operations on that object, then removed through the plugin's socket, and the state audited again."""
from __future__ import annotations

import contextlib
import sqlite3
import subprocess
import time

from .audit import audit_netplugin
from .netns import entered

# parent NIC -> (subnet, gateway); the router answers on both gateways
SLOTS = {"eth1": ("10.77.0.0/25", "10.77.0.1"), "eth2": ("10.77.0.128/25", "10.77.0.129")}


class DockerAudit:
    """Mixed into DockerTorture, whose view(), docker(), counts, findings and budgets it reads."""

    def audit(self, when: str, *, final: bool = False) -> list[str]:
        """Docker against both plugins, the kernel and Ceph. What only a cut-off request explains is counted
        apart and removed through the plugin's socket; the state after that is audited again."""
        self.counts["audits"] += 1
        kept, garbage = self._audit_once(final)
        for plugin, route, body in garbage:
            status, reply = plugin.request(route, body)
            self.counts["leftovers removed through a socket"] += 1
            if status != 200 or reply.get("Err"):
                kept.append(f"removing a leftover: {route} {body} -> {status} {reply}")
        if garbage:
            again, left = self._audit_once(final)
            kept += [f"then: {f}" for f in again] + [f"then still: {route} {body}" for _, route, body in left]
        self.findings += [f"{when}: {f}" for f in kept]
        return kept

    def _audit_once(self, final: bool) -> tuple[list[str], list[tuple]]:
        v = self.view()
        net_found, net_garbage = self._audit_netplugin(v, final)
        vol_found, vol_garbage = self._audit_volplugin(v, final)
        return self._audit_containers(v) + net_found + vol_found, net_garbage + vol_garbage

    def _within(self, kind: str, scope: str, key: str, budget: int) -> bool:
        """Count ``key`` apart as left by a cut-off request while the kills during operations on ``scope``
        leave room for it (one each)."""
        seen = self.excused.setdefault(kind, set())
        if (scope, key) in seen or sum(1 for s, _ in seen if s == scope) < budget:
            seen.add((scope, key))
            return True
        return False

    def _audit_containers(self, v) -> list[str]:
        found = [f"container {n} (started) is {v['containers'][n]['status'] if n in v['containers'] else 'gone'}"
                 for n in sorted(self.live) if not v["containers"].get(n, {}).get("running")]
        for name, c in sorted(v["containers"].items()):
            for net, info in c["networks"].items() if c["running"] else ():
                ip = v["networks"].get(net, {}).get("endpoints", {}).get(info["endpoint"])
                if not ip and (net, name) in self.failed_connects:  # a Docker bug, not the plugin's: dockerd
                    # keeps the entry it wrote before the Join failed, while libnetwork dropped the endpoint
                    self.excused.setdefault("container entries of a failed connect", set()).add((name, net))
                elif not ip:
                    found.append(f"running container {name} has no endpoint on {net} ({info})")
                elif not _retry(lambda: self.physnet.lab.ping(self.physnet.router, ip), 5):
                    found.append(f"running container {name}: {ip} on {net} does not answer a ping")
            for vol in c["mount_ids"]:
                want = set(self.tokens.get(vol, []))
                have = _retry(lambda: (lambda s: s if want <= s else None)(set(self.docker(
                    "exec", name, "cat", "/data/marker").stdout.split())), 5) or set()
                if not want <= have:
                    found.append(f"container {name}: volume {vol} lost tokens {sorted(want - have)}")
        return found

    def _audit_netplugin(self, v, final: bool) -> tuple[list[str], list[tuple]]:
        nets = v["networks"]
        endpoints = {e: name for name, n in nets.items() for e in n["endpoints"]}
        held = {(n["pool"], address) for n in nets.values() for address in [n["gateway"], *n["endpoints"].values()]}
        db = self.np.state_dir / "netplugin.db"
        with entered(self.physnet.hosta):  # the kernel side, read inside the Docker host
            kernel = audit_netplugin(db, parents=list(SLOTS), held_addresses=held) + _htb_leftovers(db)
        rows = dict(self.np.state_rows("SELECT id, status FROM networks"))
        eps = {e: (n, s) for e, n, s in self.np.state_rows("SELECT id, network_id, sandbox FROM endpoints")}
        docker_nets = {n["id"]: name for name, n in nets.items()}
        found = [f"Docker's network {name} is {rows.get(i, 'unknown to netplugin')}"
                 for i, name in docker_nets.items() if rows.get(i) != "ready"]
        found += [f"Docker's endpoint {e[:12]} on {n} is {'not joined' if e in eps else 'unknown to netplugin'}"
                  for e, n in endpoints.items() if not eps.get(e, ("", ""))[1]]
        garbage, forgotten = [], set()
        for n in sorted(set(rows) - set(docker_nets)):
            if not any(s for net, s in eps.values() if net == n) and self._within(
                    "networks Docker forgot", "", n, self.cut["network"]):
                garbage.append((self.np, "/NetworkDriver.DeleteNetwork", {"NetworkID": n}))
                forgotten.add(n[:12])
            else:
                found.append(f"network {n[:12]} netplugin keeps but Docker does not")
        for e in sorted(set(eps) - set(endpoints)):
            net, sandbox = eps[e]
            if net[:12] in forgotten:
                forgotten.add(e[:12])  # goes with its network
            elif not sandbox and self._within("endpoints Docker forgot", "", e, self.cut["netplugin"]):
                garbage.append((self.np, "/NetworkDriver.DeleteEndpoint", {"NetworkID": net, "EndpointID": e}))
                forgotten.add(e[:12])
            else:
                found.append(f"endpoint {e[:12]} ({'joined' if sandbox else 'not joined'}) netplugin keeps, Docker not")
        for f in kernel:
            address, _, pool = f.removeprefix("leaked address ").partition(" in pool ")
            if f.startswith("leaked address ") and self._within(
                    "addresses Docker never got", pool, address, self.lost_addresses[pool]):
                garbage.append((self.np, "/IpamDriver.ReleaseAddress", {"PoolID": pool, "Address": address}))
            elif not any(o in f for o in forgotten):
                found.append(f)
        if final and not nets:  # a pool keeps its gateway address: only what Docker never released may stay
            for pool, in self.np.state_rows("SELECT id FROM ipam_pools"):
                if self._within("pool references Docker never got", "", pool, self.cut["network"]):
                    garbage.append((self.np, "/IpamDriver.ReleasePool", {"PoolID": pool}))
                else:
                    found.append(f"pool {pool} left with no network")
            found += [f"address {addr} ({kind}) left in pool {pool}, which is gone"
                      for pool, addr, kind in self.np.state_rows("SELECT pool_id, addr, kind FROM ipam_addresses "
                                                                 "WHERE pool_id NOT IN (SELECT id FROM ipam_pools)")]
        return found, garbage

    def _audit_volplugin(self, v, final: bool) -> tuple[list[str], list[tuple]]:
        from .volaudit import audit_volplugin  # imports rados: only where the test Ceph runs
        held = {vol: set() for vol in v["volumes"]}
        for c in v["containers"].values():
            for vol, mount_id in c["mount_ids"].items():
                held.setdefault(vol, set()).add(mount_id)
        maybe_held, garbage = {}, []
        with contextlib.closing(sqlite3.connect(f"file:{self.vp.state_dir / 'volplugin.db'}?mode=ro", uri=True)) as db:
            callers = db.execute("SELECT volume, caller FROM mount_ids").fetchall()
        for vol, caller in callers:
            if caller not in held.get(vol, ()) and self._within(
                    "mounts Docker never unmounts", vol, caller, self.lost_mounts[vol]):
                maybe_held.setdefault(vol, set()).add(caller)
                garbage.append((self.vp, "/VolumeDriver.Unmount", {"Name": vol, "ID": caller}))
        found = audit_volplugin(self.vp, self.ceph, prefix=self.tag, held=held, maybe_held=maybe_held,
                                maybe_present=set() if final else self.cut_volumes)
        return found, garbage


def _retry(probe, seconds: float):
    deadline = time.monotonic() + seconds
    while not (value := probe()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return value


def _htb_leftovers(db) -> list[str]:
    """netplugin's HTB root qdisc only on parents some network of the plugin uses (run inside the host)."""
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as con:
        used = {r[0] for r in con.execute("SELECT parent FROM networks")}
    return [f"HTB root qdisc left on {parent}, which no network uses" for parent in SLOTS if parent not in used
            and "htb 1:" in subprocess.run(["tc", "qdisc", "show", "dev", parent], capture_output=True, text=True,
                                           timeout=30).stdout]

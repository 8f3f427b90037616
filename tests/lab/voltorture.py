"""Crash-injection torture of a served volplugin on RBD straight through its socket: random sequences of
what dockerd does with volumes (create, mount for a container with a fresh ID, unmount, remove), with
``kill -9`` of the whole plugin between and in the middle of requests, restarts, and stops of the Ceph
OSD. Data is written at every mount and must still be there at every later mount and audit. After
every round ``audit_volplugin`` compares the plugin's state, this host (mounts, loop devices, rbd-fuse
processes) and Ceph (images, ownership records, watchers) with what "Docker" holds.

The caller plays dockerd faithfully (see tests/lab/torture.py for the wire rules):
- A Mount that fails leaves no mount ID in Docker (``MountPoint.Setup`` sets it only on success), so
  Docker never sends its Unmount. When the reply was lost, the plugin may still hold that ID:
  counted in ``lost_mounts``, and the volume's Remove must still succeed (the plugin finds the ID
  stale: no container uses the filesystem).
- An Unmount that fails keeps Docker's mount ID: the container's next start Mounts with the same ID,
  its next stop Unmounts it again (``retry_unmounts``).
- A Create or Remove that fails leaves Docker without the volume, resp. with it: a user repeats
  ``docker volume rm``, and may never repeat a failed create (its name is not reused here).
"""
from __future__ import annotations

import os
import random
import signal
import sqlite3
import threading
import time
from pathlib import Path

from .torture import LostReply, NetTorture
from .volaudit import audit_volplugin

TOKEN_FILE = "torture-tokens"


class VolTorture(NetTorture):
    """Shares the wire (call/quietly, retries, lost replies), the fault injection and step() with the
    netplugin torture; the operations and the audit are the volume driver's."""

    def __init__(self, plugin, ceph, rng: random.Random, *, prefix: str, attach: str = "fuse"):
        super().__init__(plugin, [], rng)
        self.ceph, self.prefix, self.attach = ceph, prefix, attach  # attach: what volaudit checks on the host
        self.volumes: dict[str, dict] = {}  # name -> {"callers": set, "tokens": [str], "mountpoint"}
        self.retry_unmounts: dict[str, str] = {}  # mount ID whose Unmount failed -> volume
        self.removing: set[str] = set()  # volumes whose Remove reply was lost: repeated later
        self.failed_creates: set[str] = set()  # names whose Create failed: Docker has no such volume
        self.lost_mounts: dict[str, set] = {}  # volume -> mount IDs whose Mount reply was lost
        self.osd_down = False
        self.last_fault = 0.0  # monotonic time of the last kill or OSD start
        self.counts.update({"OSD stops": 0, "lost mount replies": 0})
        self._names = iter(range(1, 1 << 20))

    def call(self, route: str, body: dict) -> dict:
        reply = super().call(route, body)
        if reply.get("Err"):
            raise RuntimeError(f"{route} {body} -> {reply['Err']}")
        return reply

    # -- what dockerd does --
    def create_volume(self) -> None:
        if len(self.volumes) >= 6:
            return self.remove_volume()
        name = f"{self.prefix}{next(self._names)}"
        size = self.rng.choice(["64M", "96M"])
        try:
            self.call("/VolumeDriver.Create", {"Name": name, "Opts": {"size": size, "fs": "ext4"}})
        except Exception:
            self.failed_creates.add(name)
            raise
        self.volumes[name] = {"callers": set(), "tokens": [], "mountpoint": ""}

    def remove_volume(self) -> None:
        idle = sorted(n for n, v in self.volumes.items() if not v["callers"]
                      and n not in self.retry_unmounts.values())
        if not idle:
            return self.unmount() if any(v["callers"] for v in self.volumes.values()) else self.create_volume()
        name = self.rng.choice(idle)
        try:
            self.call("/VolumeDriver.Remove", {"Name": name})
        except LostReply:
            self.removing.add(name)  # Docker keeps it; the user repeats `docker volume rm`
            raise
        self.removing.discard(name)
        self.lost_mounts.pop(name, None)
        del self.volumes[name]

    def mount(self) -> None:
        usable = sorted(set(self.volumes) - self.removing)
        if not usable:
            return self.create_volume()
        name = self.rng.choice(usable)
        caller = "%032x" % self.rng.getrandbits(128)
        try:
            mountpoint = self.call("/VolumeDriver.Mount", {"Name": name, "ID": caller})["Mountpoint"]
        except LostReply:
            self.lost_mounts.setdefault(name, set()).add(caller)
            self.counts["lost mount replies"] += 1
            raise
        volume = self.volumes[name]
        volume["callers"].add(caller)
        volume["mountpoint"] = mountpoint
        self._check_and_write(name, mountpoint)

    def _check_and_write(self, name: str, mountpoint: str) -> None:
        """The container's work: every token written before is still there; one more, synced."""
        volume, path = self.volumes[name], Path(mountpoint, TOKEN_FILE)
        found = path.read_text().split() if path.exists() else []
        missing = [t for t in volume["tokens"] if t not in found]
        if missing:
            self.findings.append(f"volume {name} lost {len(missing)} of {len(volume['tokens'])} written tokens")
        token = "%08x" % self.rng.getrandbits(32)
        with open(path, "a") as f:
            f.write(token + "\n")
            f.flush()
            os.fsync(f.fileno())
        volume["tokens"].append(token)

    def unmount(self) -> None:
        if self.retry_unmounts:  # a container whose last stop failed starts and stops again
            caller, name = next(iter(sorted(self.retry_unmounts.items())))
            self.call("/VolumeDriver.Mount", {"Name": name, "ID": caller})
            del self.retry_unmounts[caller]
            self.volumes[name]["callers"].add(caller)
        held = sorted((n, c) for n, v in self.volumes.items() for c in v["callers"])
        if not held:
            return self.mount()
        name, caller = self.rng.choice(held)
        self.volumes[name]["callers"].discard(caller)
        try:
            self.call("/VolumeDriver.Unmount", {"Name": name, "ID": caller})
        except Exception:
            self.retry_unmounts[caller] = name
            raise

    def osd_stop_start(self) -> None:
        """The only OSD stops; a request starts; a few seconds later the OSD starts again. The request
        waits for it or fails clearly; mounted volumes keep their data."""
        self.counts["OSD stops"] += 1
        self.trace.append(("osd stop", None, None))
        self.ceph.stop_osd()
        self.osd_down = True
        worker = threading.Thread(target=self._run, args=(self.rng.choice(
            [self.mount, self.unmount, self.create_volume, self.remove_volume]), []))
        try:
            worker.start()
            time.sleep(self.rng.uniform(1, 5))
        finally:
            self.ceph.start_osd()
            self.osd_down = False
            self.last_fault = time.monotonic()
        worker.join(120)
        assert not worker.is_alive(), "a request hung after the OSD came back"

    # -- the run --
    def operation(self):
        weights = [(self.create_volume, 1.5), (self.remove_volume, 1), (self.mount, 3), (self.unmount, 3),
                   (self.osd_stop_start, self.osd_rate)]
        return self.rng.choices([w[0] for w in weights], [w[1] for w in weights])[0]

    osd_rate = 0.25  # weight: about one operation in 35

    def audit(self, when: str) -> list[str]:
        held = {n: set(v["callers"]) for n, v in self.volumes.items()}
        # an ID whose Unmount failed may be gone from the plugin (its reply was lost) or not
        maybe_held = {n: set(ids) for n, ids in self.lost_mounts.items()}
        for caller, name in self.retry_unmounts.items():
            maybe_held.setdefault(name, set()).add(caller)
        found = audit_volplugin(self.plugin, self.ceph, prefix=self.prefix, held=held,
                                maybe_held=maybe_held, maybe_present=self.removing | self.failed_creates,
                                watches_may_linger=self._watches_may_linger(), attach=self.attach)
        for name, volume in self.volumes.items():  # data of what is mounted now
            if volume["callers"] and volume["tokens"]:
                path = Path(volume["mountpoint"], TOKEN_FILE)
                found_tokens = path.read_text().split() if path.exists() else []
                if found_tokens[:len(volume["tokens"])] != volume["tokens"]:
                    found.append(f"mounted volume {name} does not hold its {len(volume['tokens'])} tokens")
        self.findings += [f"{when}: {f}" for f in found]
        return found

    def _watches_may_linger(self) -> bool:
        """A writer (rbd-fuse) SIGKILLed by a kill or a cut-off detach leaves its watch for the OSD's
        watch timeout, and every OSD start re-arms it: until then Ceph still lists the dead client."""
        return time.monotonic() - self.last_fault < self.ceph.watch_timeout + 10

    def _remove_waiting_out_watches(self, name: str) -> None:
        deadline = time.monotonic() + self.ceph.watch_timeout + 15
        while True:
            try:
                return self.call("/VolumeDriver.Remove", {"Name": name})
            except RuntimeError as exc:
                if "is open by clients" not in str(exc) or not self._watches_may_linger() \
                        or time.monotonic() > deadline:
                    raise
                self.counts["Removes waiting out a dead client's watch"] = \
                    self.counts.get("Removes waiting out a dead client's watch", 0) + 1
                time.sleep(2)

    def teardown(self) -> None:
        for caller, name in list(self.retry_unmounts.items()):
            self.call("/VolumeDriver.Mount", {"Name": name, "ID": caller})
            self.volumes[name]["callers"].add(caller)
            del self.retry_unmounts[caller]
        for name, volume in self.volumes.items():
            for caller in sorted(volume["callers"]):
                self.call("/VolumeDriver.Unmount", {"Name": name, "ID": caller})
            volume["callers"].clear()
        for name in sorted(self.volumes):
            self._remove_waiting_out_watches(name)
        self.volumes.clear()
        self.lost_mounts.clear()
        for name in sorted(self.removing | self.failed_creates):  # nothing of these may stay behind
            self.quietly("/VolumeDriver.Remove", {"Name": name})
        self.removing.clear()
        self.failed_creates.clear()

    def kill_and_restart(self) -> None:
        self.last_fault = time.monotonic()
        if self.osd_down:  # start-up reconciliation waits for Ceph: keep the kill, skip the wait
            self.plugin.kill(signal.SIGKILL)
            self.plugin.start(timeout=90)
            self.counts["restarts"] += 1
            return
        super().kill_and_restart()


def state_row_counts(plugin) -> dict:
    """Rows left in the plugin's volumes, attachments and mount_ids tables."""
    db = sqlite3.connect(plugin.state_dir / "volplugin.db", timeout=10)
    try:
        return {t: db.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                for t in ("volumes", "attachments", "mount_ids")}
    finally:
        db.close()

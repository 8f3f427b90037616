"""The one way volplugin runs LVM: ``lvm <command>`` through plugincore.run (argv list, timeout, LC_ALL=C),
JSON reports, and typed errors carrying LVM's stderr (the shape of topolvm's lvm_command.go).

Every command gets the same ``--config`` so that nothing waits for udev: without it, lvcreate and
lvchange block until udev confirms the device nodes, which never happens in a plugin container without
/run/udev, a VM without udevd, or a host whose udev is wedged. LVM then creates /dev/mapper and
/dev/<vg> nodes itself. The same ``--config`` keeps LVM away from block devices that wait on Ceph
(lvm_devices), so that a Ceph outage never stalls LVM volumes.
"""
from __future__ import annotations

import json
import re

from plugincore.errors import BackendError, Conflict, NotFound
from plugincore.run import CommandError, CommandTimeout, run

from .lvm_devices import configured_global_filter, filter_setting, reject_patterns

LVM = "lvm"
# LVM answers "not found" with exit status 5, like most other failures: the message tells them apart.
_NOT_FOUND = re.compile(r"Failed to find logical volume|Volume group \"[^\"]*\" not found|"
                        r"not found in volume group|Cannot process volume group", re.IGNORECASE)
_IN_USE = re.compile(r"contains a filesystem in use|is used by another device|in use|"
                     r"Can't remove open logical volume|device or resource busy", re.IGNORECASE)
# A caller's other open descriptors are none of LVM's business: no "File descriptor leaked" warnings in
# the stderr that error messages quote.
_ENV = {"LVM_SUPPRESS_FD_WARNINGS": "1"}
_EXISTS = re.compile(r"already exists", re.IGNORECASE)


class LvmError(BackendError):
    """An lvm command failed; ``stderr`` and ``returncode`` are LVM's."""

    def __init__(self, what: str, error: CommandError):
        self.argv, self.returncode, self.stderr = error.argv, error.returncode, error.stderr
        super().__init__(f"{what}: {error}")


class LvmNotFound(LvmError, NotFound):
    pass


class LvmInUse(LvmError, Conflict):
    pass


class LvmExists(LvmError, Conflict):
    pass


def no_udev_config(monitoring: bool, global_filter: list[str] = ()) -> str:
    # monitoring = dmeventd, which runs thin_pool_autoextend: keep it on in production, off in tests
    # (it would start a daemon nobody stops).
    devices = "obtain_device_list_from_udev = 0" + (f" {filter_setting(global_filter)}" if global_filter else "")
    return ("activation { udev_sync = 0 udev_rules = 0 verify_udev_operations = 0 "
            f"monitoring = {int(monitoring)} }} devices {{ {devices} }} "
            "global { use_lvmpolld = 0 }")


class Lvm:
    def __init__(self, *, timeout: float = 60.0, monitoring: bool = True):
        self.timeout = timeout
        self.monitoring = monitoring
        self._hosts_filter: list[str] | None = None  # lvm.conf's global_filter, read once

    def config(self) -> str:
        """The ``--config`` of one command: no udev, and no scan of devices that wait on Ceph
        (lvm_devices: recomputed each time, attachments come and go)."""
        if self._hosts_filter is None:
            self._hosts_filter = configured_global_filter(self.timeout)
        return no_udev_config(self.monitoring, reject_patterns() + (self._hosts_filter or []))

    def __call__(self, command: str, *args: str, what: str = "", timeout: float | None = None) -> str:
        """Run ``lvm command args``; return stdout. Raises LvmNotFound / LvmInUse / LvmExists / LvmError."""
        argv = [LVM, command, "--config", self.config(), *args]
        try:
            return run(argv, timeout=timeout or self.timeout, env=_ENV).stdout
        except CommandTimeout as exc:
            raise LvmError(what or f"lvm {command}", exc) from None
        except CommandError as exc:
            raise _classify(what or f"lvm {command}", exc) from None

    def report(self, command: str, *args: str, fields: str, what: str = "") -> list[dict]:
        """Rows of ``lvs``/``vgs``/``pvs`` as dicts, sizes in bytes without suffix."""
        out = self(command, "--reportformat", "json", "--units", "b", "--nosuffix", "-o", fields, *args,
                   what=what)
        try:
            report = json.loads(out)["report"]
        except (ValueError, KeyError) as exc:
            raise BackendError(f"{what or 'lvm ' + command}: unreadable report ({exc}): {out[:200]}") from None
        key = command[:-1] if command.endswith("s") else command  # lvs -> lv, vgs -> vg
        return [row for section in report for row in section.get(key, [])]


def _classify(what: str, error: CommandError) -> LvmError:
    text = error.stderr
    if _NOT_FOUND.search(text):
        return LvmNotFound(what, error)
    if _EXISTS.search(text):
        return LvmExists(what, error)
    if _IN_USE.search(text):
        return LvmInUse(what, error)
    return LvmError(what, error)


def percent(value) -> float:
    """LVM's "12.34" (or "" for an inactive LV) as a float."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0


def number(value) -> int:
    try:
        return int(float(value))
    except (TypeError, ValueError):
        return 0

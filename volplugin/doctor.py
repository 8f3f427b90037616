"""`volplugin doctor`: is this host ready to run volplugin with its configured backends, and is it
running? Each finding is OK, WARN or FAIL with what is missing and how to fix it (plugincore.doctor);
exit status 1 if anything failed.

Checks: root; the socket and a live plugin behind it; dockerd and whether it reaches the plugin (it
asks the plugin when listing the driver's volumes); the state directory; the filesystem tools; per
configured backend - rbd: the Ceph bindings, ceph.conf (or the embedded cluster), the cluster within
connect_timeout (at most 5 s here), its health, the pool, and the ways to attach an image (krbd,
rbd-nbd, rbd-fuse + loop devices; one is enough, the others are WARNs); lvm: the lvm tool,
device-mapper with thin provisioning, the volume group and thin pool, and the pool's fill against
warn_pool_percent / max_pool_percent. Nothing is created or changed (one exception: loading the
rbd kernel module, as the plugin does before its first krbd attach).
"""
from __future__ import annotations

import json
import os
import shutil

from plugincore import doctor as d
from plugincore.errors import NotFound, PluginError
from plugincore.run import CommandError, run

CAP = 5.0  # seconds: no probe of the doctor waits longer, whatever the configured timeouts
OP_CAP = 3.0  # seconds for one Ceph operation once connected
START = "start the plugin: volplugin serve [--config FILE] (or its service)"
MKFS = {"xfs": ("mkfs.xfs", "xfsprogs"), "ext4": ("mkfs.ext4", "e2fsprogs")}


def kernel_fix(module: str, option: str) -> str:
    if os.path.exists("/proc/modules"):
        return f"modprobe {module} (to load at boot: echo {module} > /etc/modules-load.d/volplugin.conf)"
    return f"this kernel has no loadable modules: boot a kernel built with {option} (Debian's stock kernel is)"


def tool_checks(config: dict) -> list[d.Check]:
    default_fs = config["volume"]["fs"]
    checks = [d.tool_check("blkid", "util-linux", "finding a volume's filesystem before mkfs"),
              d.tool_check("mount", "mount", "mounting volumes")]
    for fs, (program, package) in MKFS.items():
        required = fs == default_fs
        why = f"new volumes ([volume] fs = \"{fs}\")" if required else f"volumes made with -o fs={fs}"
        checks.append(d.tool_check(program, package, why, required=required))
    checks.append(d.tool_check("xfs_growfs" if default_fs == "xfs" else "resize2fs", MKFS[default_fs][1],
                               "volplugin grow of a mounted volume", required=False))
    checks.append(d.tool_check("fsfreeze", "util-linux", "snapshots of mounted RBD volumes (frozen around "
                               "the snapshot)", required="rbd" in config["backends"]))
    return checks


def docker_checks(config: dict, docker_host: str) -> list[d.Check]:
    check, client = d.docker_check(docker_host, "--docker-host")
    if client is None:
        return [check]
    driver = os.path.basename(config["socket"]).removesuffix(".sock")
    name = f"dockerd reaches driver {driver}"
    try:
        # dockerd asks the plugin (VolumeDriver.List) for this: an end-to-end check
        volumes = client.api.volumes(filters={"driver": driver}).get("Volumes") or []
    except Exception as exc:  # noqa: BLE001 - DockerException, a timeout
        return [check, d.warn(name, f"listing its volumes failed: {d.short(exc)}",
                              f"is the plugin running ({config['socket']})? see its log and dockerd's")]
    finally:
        client.close()
    return [check, d.ok(name, f"it lists {len(volumes)} volume(s) of it")]


# ---- rbd ---------------------------------------------------------------------------------------

def rbd_checks(config: dict) -> list[d.Check]:
    from .backends import rbd_cluster

    attach = attach_checks()  # host facts: whatever the cluster's state
    if not rbd_cluster.available():
        return [d.fail("rbd: Ceph Python bindings", "python3-rados / python3-rbd are not importable",
                       "apt-get install python3-rados python3-rbd (the venv needs --system-site-packages)")] + attach
    rbd = config["rbd"]
    checks, conf = [], rbd["conf"]
    if not conf:
        from .service import embedded_cluster
        cluster = embedded_cluster(config)
        conf = cluster.conf_path
        if not cluster.is_running():
            return [d.warn("rbd: embedded Ceph cluster", f"not running in {cluster.directory}: `volplugin serve` "
                           "creates or starts it (a real cluster: [rbd] conf)", START)] + attach
        checks.append(d.ok("rbd: embedded Ceph cluster", f"running in {cluster.directory}"))
    for what, path in (("ceph.conf", conf), ("keyring", rbd["keyring"])):
        if path and not os.access(path, os.R_OK):
            key = "[rbd] conf" if what == "ceph.conf" else "[rbd] keyring"
            return checks + [d.fail(f"rbd: {what}", f"{path} is missing or unreadable", f"set {key} to a readable file")
                             ] + attach
    timeout = min(float(rbd["connect_timeout"]), CAP)
    cluster = rbd_cluster.Cluster(conf_path=conf, client_name=rbd["client_name"], keyring=rbd["keyring"] or None,
                                  connect_timeout=timeout, op_timeout=min(float(rbd["op_timeout"]), OP_CAP))
    try:
        client = cluster.client()
    except PluginError as exc:
        return checks + [d.fail("rbd: Ceph cluster", str(exc), "check that the monitors in "
                                f"{conf} are up and reachable (ceph -s), [rbd] client_name and keyring")] + attach
    checks.append(d.ok("rbd: Ceph cluster", f"connected as {rbd['client_name']} within {timeout:g}s"))
    checks.append(_health(cluster, client))
    pool = rbd["pool"]
    try:
        cluster.call(f"opening pool {pool}", lambda ioctx: None, pool=pool, timeout=OP_CAP)
        checks.append(d.ok(f"rbd: pool {pool}", "exists"))
    except NotFound:
        checks.append(d.fail(f"rbd: pool {pool}", "does not exist", f"ceph osd pool create {pool} && rbd pool init "
                             f"{pool} (or set [rbd] pool)"))
    except PluginError as exc:
        checks.append(d.fail(f"rbd: pool {pool}", str(exc), "ceph -s; ceph osd pool ls"))
    return checks + attach


def _health(cluster, client) -> d.Check:
    command = json.dumps({"prefix": "health", "format": "json"})
    try:
        ret, out, err = cluster.bounded(lambda: client.mon_command(command, b""), OP_CAP, "health")
        health = json.loads(out or b"{}") if ret == 0 else {}
    except Exception as exc:  # noqa: BLE001 - TimeoutError, rados errors
        return d.warn("rbd: cluster health", f"not read: {exc or 'timed out'}", "ceph health detail")
    status = health.get("status", "")
    if status == "HEALTH_OK":
        return d.ok("rbd: cluster health", status)
    reasons = [c.get("summary", {}).get("message", name) for name, c in (health.get("checks") or {}).items()]
    make = d.fail if status == "HEALTH_ERR" else d.warn
    detail = f"{status} ({'; '.join(reasons)})" if reasons else status or f"unknown ({err})"
    return make("rbd: cluster health", detail, "ceph health detail")


def attach_checks() -> list[d.Check]:
    """krbd, rbd-nbd and rbd-fuse + loop, tried in that order by the plugin: one usable one is enough."""
    from .backends.rbd_devices import Fuse, Krbd, Nbd

    found = {}
    for method in (Krbd, Nbd):
        missing = []
        if not shutil.which(method.program):
            missing.append(f"{method.program} is not installed")
        elif not os.path.isdir(method.module_sysfs):
            try:  # as the plugin does before its first attach
                run(["modprobe", method.module], timeout=CAP, check=False)
            except CommandError:
                pass
            if not os.path.isdir(method.module_sysfs):
                missing.append(f"the kernel has no {method.module} module ({method.module_sysfs} missing)")
        found[method.name] = missing
    fuse = [f"{p} is not installed" for p in (Fuse.program, "losetup") if not shutil.which(p)]
    fuse += [f"{dev} is missing" for dev in ("/dev/fuse", "/dev/loop-control") if not os.path.exists(dev)]
    found["fuse"] = fuse
    fixes = {"krbd": kernel_fix("rbd", "CONFIG_BLK_DEV_RBD") if shutil.which("rbd") else "apt-get install ceph-common",
             "nbd": "apt-get install rbd-nbd; " + kernel_fix("nbd", "CONFIG_BLK_DEV_NBD"),
             "fuse": "apt-get install rbd-fuse; modprobe fuse loop"}
    usable = [m for m, missing in found.items() if not missing]
    checks = []
    for method, missing in found.items():
        name = f"rbd: attach via {method}"
        if not missing:
            checks.append(d.ok(name, "usable" + (" (the first usable one is used)" if method == usable[0] else "")))
        else:
            make = d.warn if usable else d.fail
            rest = f"falls back to {usable[0]}" if usable and usable[0] != method else "no way to attach volumes"
            checks.append(make(name, f"{'; '.join(missing)}: {rest}", fixes[method]))
    return checks


# ---- lvm ---------------------------------------------------------------------------------------

def lvm_checks(config: dict) -> list[d.Check]:
    from .backends.lvm_command import Lvm, LvmNotFound, percent

    lvm = config["lvm"]
    checks = [d.tool_check("lvm", "lvm2", "the LVM backend ([lvm] in backends)")]
    if checks[0].status != d.OK:
        return checks
    checks += _device_mapper()
    if any(c.status == d.FAIL for c in checks):
        return checks
    vg, pool = lvm["vg"], lvm["thin_pool"]
    name = f"lvm: thin pool {vg}/{pool}"
    setup = (f"volplugin lvm-setup --loop-file {lvm['loop_file']} --size SIZE (or `volplugin serve` re-attaches an "
             "existing file)" if lvm["loop_file"] else "volplugin lvm-setup --device /dev/DISK ([lvm] vg, thin_pool)")
    try:
        rows = Lvm(timeout=CAP, monitoring=lvm["monitoring"]).report(
            "lvs", vg, fields="lv_name,segtype,data_percent,metadata_percent,lv_size", what=f"listing {vg}")
    except LvmNotFound:
        return checks + [d.fail(name, f"volume group {vg} does not exist", setup)]
    except PluginError as exc:
        return checks + [d.fail(name, str(exc), "vgs; lvs (is LVM's lock or a device hung?)")]
    row = next((r for r in rows if r["lv_name"] == pool), None)
    if row is None or row["segtype"] != "thin-pool":
        return checks + [d.fail(name, f"no thin pool {pool} in volume group {vg}", setup)]
    fullest = max(percent(row["data_percent"]), percent(row["metadata_percent"]))
    detail = f"data {percent(row['data_percent']):g}%, metadata {percent(row['metadata_percent']):g}%"
    grow = f"lvextend -L +10G {vg}/{pool} (or remove volumes or snapshots)"
    if fullest >= lvm["max_pool_percent"]:
        return checks + [d.fail(name, f"{detail}: at least max_pool_percent ({lvm['max_pool_percent']:g}%): "
                                "creates, grows and snapshots are refused", grow)]
    if fullest >= lvm["warn_pool_percent"]:
        return checks + [d.warn(name, f"{detail}: at least warn_pool_percent ({lvm['warn_pool_percent']:g}%); a "
                                "full thin pool freezes every volume in it", grow)]
    return checks + [d.ok(name, f"{detail} (warn at {lvm['warn_pool_percent']:g}%, refuse at "
                          f"{lvm['max_pool_percent']:g}%)")]


def _device_mapper() -> list[d.Check]:
    try:
        with open("/proc/misc") as f:
            present = any(line.split()[-1:] == ["device-mapper"] for line in f)
    except OSError:
        present = False
    if not present:
        return [d.fail("lvm: device-mapper", "the kernel has no device-mapper driver (not in /proc/misc)",
                       kernel_fix("dm_mod", "CONFIG_BLK_DEV_DM"))]
    if not os.path.exists("/dev/mapper/control"):
        return [d.fail("lvm: device-mapper", "/dev/mapper/control is missing", "dmsetup mknodes")]
    checks = [d.ok("lvm: device-mapper", "/dev/mapper/control")]
    if os.path.isdir("/sys/module/dm_thin_pool"):
        return checks + [d.ok("lvm: thin provisioning", "dm_thin_pool loaded")]
    try:  # a dry run: LVM's activation loads it when a thin pool first appears
        run(["modprobe", "-n", "dm_thin_pool"], timeout=CAP)
        return checks + [d.ok("lvm: thin provisioning", "dm_thin_pool loadable (loaded on first use)")]
    except CommandError as exc:
        return checks + [d.fail("lvm: thin provisioning", f"dm_thin_pool is not available: {exc}",
                                kernel_fix("dm_thin_pool", "CONFIG_DM_THIN_PROVISIONING"))]


def checks(config: dict, docker_host: str) -> list[d.Check]:
    groups = [
        ("running as root", lambda: [d.root_check("volplugin")]),
        ("socket", lambda: d.socket_checks(config["socket"], ["VolumeDriver"], START)),
        ("dockerd", lambda: docker_checks(config, docker_host)),
        ("state", lambda: [d.state_dir_check(config["state_dir"], "state_dir (or --state-dir)")]),
        ("tools", lambda: tool_checks(config)),
    ]
    if "rbd" in config["backends"]:
        groups.append(("rbd backend", lambda: rbd_checks(config)))
    if "lvm" in config["backends"]:
        groups.append(("lvm backend", lambda: lvm_checks(config)))
    return d.run_groups(groups, timeout=CAP + 2 * OP_CAP + 1)

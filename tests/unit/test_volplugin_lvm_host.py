"""LVM backend parts that need no device-mapper (the real backend runs in the VM lane,
tests/vm/test_lvm_*.py): LVM error classification, name rules, configuration, and how the driver keeps
host-local volumes out of the shared catalog when both kinds of backend are configured."""
import pytest

from plugincore.errors import Conflict, InvalidRequest, NotFound
from plugincore.run import CommandError
from volplugin import config as volconfig
from volplugin.backends import lvm_command, lvm_devices
from volplugin.backends.base import Backend, Catalog, VolumeSpec
from volplugin.backends.lvm import LvmBackend, check_vg_name
from volplugin.backends.lvm_command import LvmError, LvmExists, LvmInUse, LvmNotFound
from volplugin.service import Services


@pytest.mark.parametrize("stderr, kind, base", [
    ('  Failed to find logical volume "vg/x"', LvmNotFound, NotFound),
    ('  Volume group "nosuch" not found\n  Cannot process volume group nosuch', LvmNotFound, NotFound),
    ("  Logical volume vg/x contains a filesystem in use.", LvmInUse, Conflict),
    ('  Logical Volume "x" already exists in volume group "vg"', LvmExists, Conflict),
    ("  Insufficient free space", LvmError, LvmError),
])
def test_lvm_errors_are_typed_and_carry_stderr(stderr, kind, base):
    error = lvm_command._classify("creating volume x", CommandError(["lvm", "lvcreate"], 5, stderr))
    assert type(error) is kind and isinstance(error, base)
    assert error.returncode == 5 and stderr.strip() in str(error) and str(error).startswith("creating volume x")


def test_lvm_config_never_waits_for_udev():
    config = lvm_command.no_udev_config(monitoring=False)
    assert "udev_sync = 0" in config and "udev_rules = 0" in config and "monitoring = 0" in config
    assert "monitoring = 1" in lvm_command.no_udev_config(monitoring=True)


def test_lvm_never_scans_devices_that_wait_on_ceph(tmp_path):
    """The filter (tests/ceph/test_lvm_beside_rbd.py shows why) as the real lvm reads it, after the
    host's own global_filter, which ``--config`` would otherwise replace."""
    lvm = lvm_command.Lvm(timeout=30, monitoring=False)
    lvm._hosts_filter = ["a|^/dev/sd|", "r|.*|"]  # as an lvm.conf restricting LVM to SCSI disks says
    out = lvm("lvmconfig", "devices/global_filter")
    assert 'r|^/dev/rbd[0-9]|' in out and out.index("r|^/dev/nbd[0-9]|") < out.index("a|^/dev/sd|")
    mountinfo = tmp_path / "mountinfo"  # a mount table and /sys/block as the kernel writes them
    mountinfo.write_text("36 25 0:50 / /run/vol\\040plugin/fuse rw - fuse.rbd-fuse rbd-fuse rw\n"
                         "37 25 0:51 / /srv rw - ext4 /dev/sda1 rw\n")
    for name, backing in (("loop3", "/run/vol plugin/fuse/rbd/pg1/pg1"), ("loop4", "/srv/disk.img")):
        (tmp_path / "block" / name / "loop").mkdir(parents=True)
        (tmp_path / "block" / name / "loop" / "backing_file").write_text(backing + "\n")
        (tmp_path / "block" / name / "dev").write_text(f"7:{name[-1]}\n")
    patterns = lvm_devices.reject_patterns(str(tmp_path / "block"), str(mountinfo))
    assert "r|^/dev/loop3$|" in patterns and "r|^/dev/block/7:3$|" in patterns
    assert not any("loop4" in p or "7:4" in p for p in patterns)  # a loop over a local file: LVM's


def test_names(tmp_path):
    backend = LvmBackend(vg="vg0", thin_pool="tp", host_id="h", state_dir=str(tmp_path), monitoring=False)
    for bad in ("snapshot-db", "pvmove1", "db_tmeta", "x_rimage_0"):
        with pytest.raises(InvalidRequest, match="LVM reserves"):
            backend.validate_name(bad)
    backend.validate_name("pg-main.1")
    for bad in ("-vg", "a/b", "..", "", "a b"):
        with pytest.raises(InvalidRequest):
            check_vg_name(bad, "volume group")
    with pytest.raises(ValueError):
        LvmBackend(vg="vg0", thin_pool="tp", host_id="h", state_dir=str(tmp_path), warn_pool_percent=95,
                   max_pool_percent=90)


def test_backend_configuration(tmp_path):
    config = volconfig.load(overrides={"state_dir": str(tmp_path), "backends": ["lvm"],
                                       "volume": {"backend": "lvm"}}, environ={})
    services = Services(config)  # builds without calling LVM: the host kernel has no device-mapper
    assert list(services.driver.backends) == ["lvm"] and services.driver.scope == "local"
    env = {"VOLPLUGIN_BACKENDS": "lvm, rbd", "VOLPLUGIN_VOLUME_BACKEND": "lvm"}
    assert volconfig.load(environ=env)["backends"] == ["lvm", "rbd"]
    with pytest.raises(InvalidRequest, match="not among the configured backends"):
        volconfig.load(overrides={"backends": ["lvm"]}, environ={})
    with pytest.raises(InvalidRequest, match="choose from"):
        volconfig.load(overrides={"backends": ["zfs"]}, environ={})


def test_shipped_volplugin_config_matches_defaults():
    import os
    shipped = os.path.join(os.path.dirname(__file__), "..", "..", "config", "volplugin.toml")
    loaded = volconfig.load(shipped, environ={})
    assert {**loaded, "host_id": ""} == {**volconfig.DEFAULTS, "host_id": ""}


class InMemoryBackend(Backend):
    """FAKE for the driver's bookkeeping only: block devices are not its business here. Stands in for
    LVM (host-local), which needs device-mapper, and for RBD (shared), which needs a cluster."""

    def __init__(self, name, host_local):
        self.name, self.host_local, self.volumes = name, host_local, set()

    def create(self, spec, clone_from=None):
        self.volumes.add(spec.name)
        return {}

    def remove(self, spec):
        self.volumes.discard(spec.name)

    def snapshot_list(self, spec):
        return [{"name": "s1", "size": 2 * 2**30, "created": ""}]


class InMemoryCatalog(Catalog):
    """FAKE of the cluster-wide catalog (RBD keeps it in RADOS)."""

    def __init__(self):
        self.records = {}

    def catalog_put(self, name, record):
        self.records[name] = record

    def catalog_get(self, name):
        return self.records.get(name)

    def catalog_list(self):
        return sorted(self.records)

    def catalog_delete(self, name):
        self.records.pop(name, None)


def test_host_local_volumes_stay_out_of_the_shared_catalog(tmp_path, monkeypatch):
    config = volconfig.load(overrides={"state_dir": str(tmp_path), "backends": ["rbd", "lvm"]}, environ={})
    catalog = InMemoryCatalog()
    backends = {"rbd": InMemoryBackend("rbd", False), "lvm": InMemoryBackend("lvm", True)}
    driver = Services(config, backends=backends, catalog=catalog).driver
    monkeypatch.setattr(driver, "_format", lambda backend, spec, options, clone=False: None)  # no block devices here
    assert driver.scope == "global"
    driver.create("shared1", {"backend": "rbd", "size": "1G"})
    driver.create("local1", {"backend": "lvm", "size": "1G"})
    assert catalog.catalog_list() == ["shared1"]
    assert [v["Name"] for v in driver.list()] == ["local1", "shared1"]
    catalog.records.clear()  # another host removed the shared volume; the local one is unaffected
    assert [v["Name"] for v in driver.list()] == ["local1"]
    assert driver.get("local1")["Status"]["backend"] == "lvm"
    with pytest.raises(NotFound):
        driver.get("shared1")
    driver.remove("local1")
    assert driver.list() == [] and backends["lvm"].volumes == set()
    with pytest.raises(InvalidRequest):
        driver.create("x", {"backend": "zfs"})
    assert VolumeSpec("a", 1).backend_data == {}


def test_a_clone_keeps_its_sources_backend_filesystem_and_layout(tmp_path, monkeypatch):
    config = volconfig.load(overrides={"state_dir": str(tmp_path), "backends": ["rbd", "lvm"],
                                       "volume": {"backend": "rbd", "fs": "ext4", "size": "1G"}}, environ={})
    backends = {"rbd": InMemoryBackend("rbd", False), "lvm": InMemoryBackend("lvm", True)}
    driver = Services(config, backends=backends, catalog=InMemoryCatalog()).driver
    monkeypatch.setattr(driver, "_format", lambda backend, spec, options, clone=False: None)
    driver.create("src", {"backend": "lvm", "fs": "xfs", "uid": "70", "pgdata": "data"})
    for opts, message in (({"fs": "ext4"}, "source's fs"), ({"backend": "rbd"}, "source's backend")):
        with pytest.raises(InvalidRequest, match=message):
            driver.create("bad", {"from": "src@s1", **opts})
    driver.create("copy", {"from": "src@s1"})
    options = driver.state.volume("copy")["options"]
    assert (options["backend"], options["fs"], options["uid"], options["pgdata"]) == ("lvm", "xfs", 70, "data")
    assert options["size"] == 2 * 2**30  # the snapshot's size: bigger than the 1G default
    assert backends["lvm"].volumes == {"src", "copy"} and backends["rbd"].volumes == set()

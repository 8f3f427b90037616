"""volplugin with the LVM backend (VM lane: device-mapper): the Docker protocol through the Flask app,
PGDATA semantics, admin operations on mounted volumes, start-up reconciliation, and a served plugin
killed with SIGKILL while volumes are mounted."""
import json
import os
import signal
import stat
import subprocess
import sys

import pytest

from tests.lab import plugin_post, sh, wait_for_own_mount_namespace
from tests.lab.plugin import Plugin
from volplugin import config as volconfig
from volplugin import filesystem
from volplugin.admin import Admin
from volplugin.reconcile import reconcile
from volplugin.service import Services, create_app

pytestmark = pytest.mark.vm
MiB = 2**20


@pytest.fixture(scope="module")
def pool(lvm_pool):
    return lvm_pool


@pytest.fixture
def config(pool, tmp_path):
    return volconfig.load(overrides=pool.config(tmp_path / "state"), environ={})


def post(client, route, body):
    response = client.post(f"/VolumeDriver.{route}", data=json.dumps(body))
    return response.status_code, json.loads(response.data)


def mounted(path) -> bool:
    return filesystem.mount_source(str(path)) is not None


def test_protocol_and_pgdata(pool, config):
    services = Services(config)
    client = create_app(config, services).test_client()
    assert post(client, "Capabilities", {})[1]["Capabilities"] == {"Scope": "local"}
    status, reply = post(client, "Create", {"Name": "snapshotdb", "Opts": {}})
    assert status == 400 and "LVM reserves" in reply["Err"] and "snapshotdb" not in pool.lvs()
    assert post(client, "Create", {"Name": "db1", "Opts": {"size": "256M", "uid": "70", "gid": "71"}})[0] == 200
    assert pool.lvs()["db1"]["lv_active"] == ""  # formatted, then deactivated until mounted
    assert post(client, "List", {})[1]["Volumes"] == [{"Name": "db1", "Mountpoint": ""}]
    st = post(client, "Get", {"Name": "db1"})[1]["Volume"]["Status"]
    assert st["backend"] == "lvm" and st["vg"] == pool.vg and st["thin_pool"] == pool.pool
    assert 0 < st["pool_data_percent"] < 50 and st["snapshots"] == [] and not st["active"]

    mountpoint = post(client, "Mount", {"Name": "db1", "ID": "c1"})[1]["Mountpoint"]
    assert mounted(mountpoint) and pool.lvs()["db1"]["lv_active"] == "active"
    pgdata = os.stat(os.path.join(mountpoint, "pgdata"))
    assert (pgdata.st_uid, pgdata.st_gid, stat.S_IMODE(pgdata.st_mode)) == (70, 71, 0o700)
    assert post(client, "Mount", {"Name": "db1", "ID": "c2"})[1]["Mountpoint"] == mountpoint
    # a container's copy of the mount: a process in its own mount namespace
    holder = subprocess.Popen(["unshare", "--mount", "sleep", "300"])
    try:
        wait_for_own_mount_namespace(holder.pid)
        status, reply = post(client, "Remove", {"Name": "db1"})
        assert status == 409 and "mounted on this host by 2 container(s) and still in use" in reply["Err"]
    finally:
        holder.kill()
        holder.wait()
    st = post(client, "Get", {"Name": "db1"})[1]["Volume"]["Status"]
    assert st["containers"] == ["c1", "c2"] and st["attached_host"] == "hostA" and st["active"]
    assert post(client, "Unmount", {"Name": "db1", "ID": "c1"})[0] == 200
    assert post(client, "Unmount", {"Name": "db1", "ID": "c1"})[0] == 200  # repeated: harmless
    assert mounted(mountpoint)
    assert post(client, "Unmount", {"Name": "db1", "ID": "c2"})[0] == 200
    assert not mounted(mountpoint) and pool.lvs()["db1"]["lv_active"] == ""
    assert post(client, "Remove", {"Name": "db1"})[0] == 200
    assert "db1" not in pool.lvs() and post(client, "List", {})[1]["Volumes"] == []
    assert post(client, "Remove", {"Name": "db1"})[0] == 200  # unknown: a success


def test_admin_on_a_mounted_volume(pool, config):
    driver = Services(config).driver
    admin = Admin(driver)
    driver.create("db2", {"size": "128M"})
    mountpoint = driver.mount("db2", "c1")
    with open(os.path.join(mountpoint, "pgdata", "row"), "w") as f:
        f.write("before")
    admin.snapshot_create("db2", "s1")  # no fsfreeze around it: LVM suspends (freezes) the origin itself
    with open(os.path.join(mountpoint, "pgdata", "row"), "w") as f:
        f.write("after")
    assert [s["name"] for s in admin.snapshot_list("db2")] == ["s1"]
    before = filesystem.usage(mountpoint)["size"]
    assert admin.grow("db2", "384M") == 384 * MiB
    assert filesystem.usage(mountpoint)["size"] > before + 200 * MiB  # the filesystem grew online
    with pytest.raises(Exception, match="mounted here"):
        admin.snapshot_rollback("db2", "s1")
    assert [(p["vg"], p["thin_pool"]) for p in admin.pools()] == [(pool.vg, pool.pool)]
    row = next(r for r in admin.status() if r["Name"] == "db2")
    assert row["Holder"] == "hostA" and [s["name"] for s in row["Snapshots"]] == ["s1"]
    driver.unmount("db2", "c1")
    admin.snapshot_rollback("db2", "s1")
    with open(os.path.join(driver.mount("db2", "c2"), "pgdata", "row")) as f:
        assert f.read() == "before"
    driver.unmount("db2", "c2")
    driver.create("db2c", {"from": "db2@s1"})  # s1 was 128M; the clone gets the default 256M
    clone_mount = driver.mount("db2c", "c3")
    with open(os.path.join(clone_mount, "pgdata", "row")) as f:
        assert f.read() == "before"
    assert filesystem.usage(clone_mount)["size"] > 200 * MiB  # its filesystem grew with it
    driver.unmount("db2c", "c3")
    for name in ("db2", "db2c"):
        driver.remove(name)
    assert not {"db2", "db2c", "db2+s1"} & set(pool.lvs())


def test_reconcile_releases_what_no_mount_explains(pool, config):
    driver = Services(config).driver
    for name in ("kept", "lost", "orphan"):
        driver.create(name, {"size": "128M"})
    kept = driver.mount("kept", "c1")
    lost = driver.mount("lost", "c2")
    sh(["umount", lost])  # the host rebooted or someone unmounted it: its container is gone
    driver.backends["lvm"].attach(driver._spec("orphan", driver.state.volume("orphan")))  # died mid-Mount

    summary = reconcile(Services(config).driver)  # a restarted plugin
    assert summary == {"kept": 1, "released": 1, "orphan_mounts": 0, "orphan_attachments": 1,
                       "unfinished_creates": 0}
    lvs = pool.lvs()
    assert lvs["kept"]["lv_active"] == "active" and mounted(kept)
    assert lvs["lost"]["lv_active"] == "" and lvs["orphan"]["lv_active"] == ""
    assert driver.state.attachment("lost") is None and driver.state.callers("kept") == ["c1"]
    driver.unmount("kept", "c1")
    for name in ("kept", "lost", "orphan"):
        driver.remove(name)


def test_kill_9_with_volumes_mounted(pool, tmp_path):
    # with loop_file set, serve re-attaches the file at start-up: here it finds the loop device in place
    toml = pool.write_config(tmp_path / "volplugin.toml", tmp_path / "unused", loop_file=pool.loop_file)
    plugin = Plugin(None, tmp_path / "plugin", name=f"vptest{os.urandom(3).hex()}",
                    command=[sys.executable, "-m", "volplugin"], extra_args=("--config", str(toml)))
    try:
        plugin.start(timeout=180)
        call = lambda route, body: plugin_post(plugin.socket, f"/VolumeDriver.{route}", body, timeout=120)
        assert call("Create", {"Name": "k9", "Opts": {"size": "128M"}})[0] == 200
        mountpoint = call("Mount", {"Name": "k9", "ID": "c1"})[1]["Mountpoint"]
        with open(os.path.join(mountpoint, "pgdata", "row"), "w") as f:
            f.write("survives")
        plugin.kill(signal.SIGKILL)  # the mount must not depend on the plugin process
        assert mounted(mountpoint) and pool.lvs()["k9"]["lv_active"] == "active"
        plugin.start(timeout=180)
        assert call("Mount", {"Name": "k9", "ID": "c2"})[1]["Mountpoint"] == mountpoint  # accounting kept
        assert call("Unmount", {"Name": "k9", "ID": "c1"})[0] == 200 and mounted(mountpoint)
        assert call("Unmount", {"Name": "k9", "ID": "c2"})[0] == 200 and not mounted(mountpoint)
        assert pool.lvs()["k9"]["lv_active"] == ""
        mountpoint = call("Mount", {"Name": "k9", "ID": "c3"})[1]["Mountpoint"]
        with open(os.path.join(mountpoint, "pgdata", "row")) as f:
            assert f.read() == "survives"
        assert call("Unmount", {"Name": "k9", "ID": "c3"})[0] == 200
        assert call("Remove", {"Name": "k9"})[0] == 200
    finally:
        plugin.stop()
        subprocess.run(["sync"], check=False)


def test_lvm_setup_and_teardown_commands(vm, tmp_path):
    vg = vm.unique("vpcli")
    toml = tmp_path / "volplugin.toml"
    toml.write_text(f'backends = ["lvm"]\n[volume]\nbackend = "lvm"\n[lvm]\nvg = "{vg}"\nmonitoring = false\n'
                    f'loop_file = "{tmp_path / "pool.img"}"\n')

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "volplugin", *args, "--config", str(toml), "--state-dir",
                               str(tmp_path / "state")], capture_output=True, text=True, timeout=300)

    try:
        assert cli("lvm-setup").returncode == 2  # no file yet and no size: refused, nothing made
        assert not (tmp_path / "pool.img").exists()
        done = cli("lvm-setup", "--size", "512M")
        assert done.returncode == 0 and "vg, pool created" in done.stdout, done.stderr
        again = cli("lvm-setup")
        assert again.returncode == 0 and "already set up" in again.stdout, again.stderr
        status = cli("status")
        assert f"thin pool {vg}/thinpool: data 0%" in status.stdout, status.stderr
    finally:
        gone = cli("lvm-teardown", "--remove-file")
    assert gone.returncode == 0, gone.stderr
    assert not (tmp_path / "pool.img").exists() and vg not in vm.run("vgs").stdout


"""The LVM thin backend against real LVM and device-mapper (VM lane): thin LVs on a loop-backed volume
group the test creates, activation, snapshots, clones, rollback, grow, and the thin pool guard."""
import os
import subprocess

import pytest

from plugincore.errors import Conflict, InvalidRequest, NotFound
from volplugin.backends.base import VolumeSpec
from volplugin.backends.lvm import SNAPSHOT_TAG, TAG, LvmBackend

pytestmark = pytest.mark.vm
MiB = 2**20


@pytest.fixture(scope="module")
def pool(lvm_pool):
    return lvm_pool


@pytest.fixture
def backend(pool, tmp_path):
    return pool.backend(tmp_path / "state")


def spec(name, size=128 * MiB):
    return VolumeSpec(name=name, size=size, backend_data={})


def write_file(device, tmp_path, name, text, fs="ext4"):
    mnt = tmp_path / "mnt"
    mnt.mkdir(exist_ok=True)
    if fs:
        subprocess.run(["mkfs.ext4", "-q", "-F", device], check=True, timeout=120)
    subprocess.run(["mount", device, str(mnt)], check=True, timeout=60)
    try:
        (mnt / name).write_text(text)
    finally:
        subprocess.run(["umount", str(mnt)], check=True, timeout=60)


def read_file(device, tmp_path, name):
    mnt = tmp_path / "mnt"
    mnt.mkdir(exist_ok=True)
    subprocess.run(["mount", "-o", "ro", device, str(mnt)], check=True, timeout=60)
    try:
        return (mnt / name).read_text()
    finally:
        subprocess.run(["umount", str(mnt)], check=True, timeout=60)


def test_create_attach_detach_remove(pool, backend, tmp_path):
    vol = spec("lv-basic")
    assert backend.create(vol) == {"vg": pool.vg, "thin_pool": pool.pool}
    row = pool.lvs()["lv-basic"]
    assert row["lv_tags"] == TAG and row["lv_skip_activation"] and row["lv_active"] == ""
    assert backend.exists(vol) and backend.attached() == {}
    backend.create(vol)  # idempotent for the same spec
    with pytest.raises(Conflict, match="different size"):
        backend.create(spec("lv-basic", 256 * MiB))

    device = backend.attach(vol)
    assert os.path.exists(device) and backend.attached() == {"lv-basic": device}
    # configured for another volume group since: the volume is still seen (start-up reconciliation)
    moved = LvmBackend(vg="vgelsewhere", thin_pool="tp", host_id="hostA", state_dir=str(tmp_path / "s2"),
                       monitoring=False)
    assert moved.attached() == {"lv-basic": device}
    assert backend.attach(vol) == device  # idempotent
    assert backend.holder(vol).host == "hostA"
    write_file(device, tmp_path, "f", "kept")
    backend.detach(vol)
    backend.detach(vol)
    assert not os.path.exists(device) and backend.holder(vol) is None
    assert read_file(backend.attach(vol), tmp_path, "f") == "kept"

    subprocess.run(["mount", device, str(tmp_path / "mnt")], check=True, timeout=60)
    try:
        with pytest.raises(Conflict, match="in use"):
            backend.remove(vol)
    finally:
        subprocess.run(["umount", str(tmp_path / "mnt")], check=True, timeout=60)
    backend.remove(vol)
    backend.remove(vol)  # unknown: a success
    backend.detach(vol)
    assert "lv-basic" not in pool.lvs() and not backend.exists(vol)
    with pytest.raises(NotFound):
        backend.attach(vol)


def test_names_lvm_reserves_and_foreign_lvs_are_refused(pool, backend):
    for name in ("snapshot1", "pg_tdata", "pvmove-x"):
        with pytest.raises(InvalidRequest, match="LVM reserves"):
            backend.validate_name(name)
    pool.lvm("lvcreate", "-y", "-T", f"{pool.vg}/{pool.pool}", "-V", "64m", "-n", "foreign")
    try:
        with pytest.raises(Conflict, match="not a volplugin volume"):
            backend.create(spec("foreign"))
        with pytest.raises(Conflict, match="not a volplugin volume"):
            backend.remove(spec("foreign"))
        assert "foreign" not in backend.attached()
    finally:
        pool.lvm("lvremove", "-y", f"{pool.vg}/foreign")


def test_snapshots_clones_and_rollback(pool, backend, tmp_path):
    vol = spec("lv-snap")
    backend.create(vol)
    device = backend.attach(vol)
    write_file(device, tmp_path, "f", "v1")
    backend.snapshot_create(vol, "s1")  # while active: LVM suspends the origin itself
    with pytest.raises(Conflict, match="already exists"):
        backend.snapshot_create(vol, "s1")
    write_file(device, tmp_path, "f", "v2", fs=None)
    assert [s["name"] for s in backend.snapshot_list(vol)] == ["s1"]
    row = pool.lvs()["lv-snap+s1"]
    assert set(row["lv_tags"].split(",")) == {TAG, SNAPSHOT_TAG} and row["lv_active"] == ""

    clone = spec("lv-clone")
    backend.create(clone, clone_from=("lv-snap", "s1"))
    backend.create(clone, clone_from=("lv-snap", "s1"))  # idempotent
    assert pool.lvs()["lv-clone"]["lv_tags"] == TAG  # a volume of its own, not a snapshot
    assert read_file(backend.attach(clone), tmp_path, "f") == "v1"
    backend.detach(clone)
    with pytest.raises(NotFound, match="lv-snap@nope does not exist"):
        backend.create(spec("lv-clone2"), clone_from=("lv-snap", "nope"))

    with pytest.raises(Conflict, match="active"):
        backend.snapshot_rollback(vol, "s1")
    backend.detach(vol)
    with pytest.raises(NotFound):
        backend.snapshot_rollback(vol, "nope")
    backend.snapshot_rollback(vol, "s1")
    assert read_file(backend.attach(vol), tmp_path, "f") == "v1"
    backend.detach(vol)
    assert [s["name"] for s in backend.snapshot_list(vol)] == ["s1"]  # the snapshot stays

    backend.snapshot_remove(vol, "s1")
    backend.snapshot_remove(vol, "s1")  # unknown: a success
    assert read_file(backend.attach(clone), tmp_path, "f") == "v1"  # the clone does not need it
    backend.detach(clone)
    backend.snapshot_create(vol, "s2")
    backend.remove(vol)  # takes its snapshots along
    backend.remove(clone)
    assert not [n for n in pool.lvs() if n.startswith("lv-")]


def test_interrupted_rollback_is_finished_on_next_use(pool, backend, tmp_path):
    vol = spec("lv-rb")
    backend.create(vol)
    write_file(backend.attach(vol), tmp_path, "f", "v1")
    backend.detach(vol)
    backend.snapshot_create(vol, "s1")
    # the plugin died after replacing the volume and before the rename
    pool.lvm("lvcreate", "-s", f"{pool.vg}/lv-rb+s1", "-n", "lv-rb+_rollback", "--addtag", TAG,
             "--setactivationskip", "y", "-y")
    pool.lvm("lvremove", "-y", f"{pool.vg}/lv-rb")
    assert backend.exists(vol)
    assert read_file(backend.attach(vol), tmp_path, "f") == "v1"
    backend.detach(vol)
    backend.remove(vol)


def test_grow_and_the_thin_pool_guard(pool, backend, tmp_path):
    usage = backend.pool_usage(pool.vg, pool.pool)
    assert usage["size"] > 800 * MiB and "warning" not in usage
    vol = spec("lv-grow")
    backend.create(vol)
    backend.resize(vol, 192 * MiB)
    assert int(pool.lvs()["lv-grow"]["lv_size"]) == 192 * MiB
    with pytest.raises(InvalidRequest, match="shrinking"):
        backend.resize(vol, 128 * MiB)

    # overcommit: the pool is ~920 MiB, the limit 4x
    with pytest.raises(Conflict, match=r"provision .*x thin pool .*limit 4x"):
        backend.create(spec("lv-huge", 4 * usage["size"]))
    with pytest.raises(Conflict, match="provision"):
        backend.resize(vol, 4 * usage["size"] + 64 * MiB)
    assert "lv-huge" not in pool.lvs()

    # fullness: fill the pool past the warning and the limit through a strict backend
    strict = pool.backend(tmp_path / "strict", warn_pool_percent=30, max_pool_percent=40)
    filler = spec("lv-fill", 512 * MiB)
    backend.create(filler)
    pool.fill(backend.attach(filler), 420)
    facts = strict.status_facts(filler)
    assert facts["pool_data_percent"] > 40 and "freezes every volume" in facts["warning"]
    with pytest.raises(Conflict, match=r"thin pool .* data is .*% full \(limit 40%\)"):
        strict.create(spec("lv-late"))
    with pytest.raises(Conflict, match="full"):
        strict.snapshot_create(vol, "s1")
    assert "lv-late" not in pool.lvs() and "lv-grow+s1" not in pool.lvs()
    backend.detach(filler)
    backend.remove(filler)
    backend.remove(vol)

"""Protocol fuzzing of a served volplugin on the test Ceph: FUZZ_REQUESTS requests (tests/lab/fuzz.py) to its
socket. Every answer must be a clear Docker-style error or a success, never an internal error; a refused
request changes no state; no traceback in the plugin's log; the plugin still answers; and once what
succeeded is undone through the protocol (Unmount, Remove), nothing of it is left: no volume, no RBD image,
no mount, no loop device."""
import json
import subprocess

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.lab import mounts_under
from tests.lab.fuzz import Fuzzer, hex_id, request_count, requests, sqlite_snapshot, values
from tests.lab.plugin import rbd_volplugin

ROUTES = [f"/VolumeDriver.{r}" for r in ("Create", "Remove", "Mount", "Unmount", "Path", "Get", "List",
                                          "Capabilities")] + ["/Plugin.Activate"]
OPTS = ["size", "fs", "uid", "gid", "pgdata", "backend", "pool", "from", "snapshot", "mkfs", "bogus"]


def _fields(names: list[str]) -> dict:
    return {
        "Name": st.sampled_from(names),
        "ID": st.one_of(st.sampled_from(["c1", "c2"]), hex_id()),
        "Opts": st.dictionaries(st.sampled_from(OPTS), st.one_of(
            st.sampled_from(["64M", "1G", "0", "-1G", "1e3", "ext4", "xfs", "zfs", "rbd", "lvm", "999", "-1",
                             "65536", "data", "../x", "/abs"]), values()), max_size=4),
    }


def _valid(names: list[str]) -> dict:
    name, caller = st.sampled_from(names[:2]), st.sampled_from(["c1", "c2"])
    return {
        "/VolumeDriver.Create": st.fixed_dictionaries({"Name": name, "Opts": st.fixed_dictionaries(
            {"size": st.sampled_from(["64M", "128M"])}, optional={
                "fs": st.sampled_from(["ext4", "xfs"]), "uid": st.sampled_from(["999", "0"]),
                "pgdata": st.sampled_from(["pgdata", "", "../up"])})}),
        "/VolumeDriver.Mount": st.fixed_dictionaries({"Name": name, "ID": caller}),
        "/VolumeDriver.Unmount": st.fixed_dictionaries({"Name": name, "ID": caller}),
        "/VolumeDriver.Remove": st.fixed_dictionaries({"Name": name}),
        "/VolumeDriver.Get": st.fixed_dictionaries({"Name": name}),
    }


def _rbd_images(ceph) -> list[str]:
    out = subprocess.run(["rbd", "--conf", str(ceph.conf_path), "ls", "--format", "json", ceph.pool],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    return json.loads(out or "[]")


def _loops(path_part: str) -> list[str]:
    out = subprocess.run(["losetup", "--list", "--noheadings", "--output", "NAME,BACK-FILE"], capture_output=True,
                         text=True, timeout=30, check=True).stdout
    return [line.split()[0] for line in out.splitlines() if path_part in line]


def test_fuzzed_requests_get_clear_errors_and_leave_nothing(ceph, tmp_path):
    plugin = rbd_volplugin(tmp_path, ceph, prefix="vpfz")
    names = [f"{plugin.name}a", f"{plugin.name}b", "", "x" * 200, "../etc", "名前", "a b", "-rf"]
    plugin.start()
    try:
        fuzzer = Fuzzer(plugin.socket, sqlite_snapshot(plugin.state_dir / "volplugin.db"))

        @settings(max_examples=request_count(), deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(requests(ROUTES, _fields(names), _valid(names)))
        def one(request):
            fuzzer.check(*request)
        one()
        print(f"\nvolplugin fuzz: {fuzzer.summary()}")
        print(fuzzer.samples.get("/VolumeDriver.Mount"))

        for route, body, _ in reversed(fuzzer.successes):
            if route == "/VolumeDriver.Mount":
                fuzzer.post("/VolumeDriver.Unmount", {"Name": body["Name"], "ID": body["ID"]})
        for route, body, _ in fuzzer.successes:
            if route == "/VolumeDriver.Create":
                status, answer = fuzzer.post("/VolumeDriver.Remove", {"Name": body["Name"]})
                assert status == 200, answer
        assert fuzzer.post("/Plugin.Activate", {})[0] == 200, "the plugin still answers"
        assert fuzzer.post("/VolumeDriver.List", {})[1]["Volumes"] == []
        assert not [i for i in _rbd_images(ceph) if i.startswith(plugin.name)]
        assert not mounts_under(tmp_path) and not _loops(str(tmp_path))
        log = plugin.log.read_text(errors="replace")
        assert "Traceback" not in log and " ERROR " not in log, plugin.log_tail(60)
    finally:
        plugin.destroy()

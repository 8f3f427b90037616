"""The systemd units under a real systemd, in the VM lane (the host has no systemd as PID 1).

Inside the throwaway guest, systemd 252 (the host's binary) boots as PID 1 of its own PID, mount and
network namespaces, in container mode, with a fresh /run. Its one job (a oneshot unit) runs
``scripts/install-service`` for real (daemon-reload, enable --now), then checks: socket activation
(the socket listens before the service runs, a request to a stopped service starts it, the socket keeps
its inode across a restart), Type=notify, that neither plugin got a mount namespace of its own, netplugin's
capability bounding set, the ordering before docker.service (starting dockerd alone starts both plugins
first), a netplugin network created and removed through that dockerd, and --uninstall. When the job ends,
systemd stops everything (dockerd before the plugins) and exits with the job's status.
"""
from __future__ import annotations

import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PREFIX = "/opt/ddp-vmtest"

pytestmark = pytest.mark.vm

CHECKS = r"""
set -euo pipefail
set -x
REPO=@REPO@
PREFIX=@PREFIX@
NP=/run/docker/plugins/netplugin.sock
VP=/run/docker/plugins/volplugin.sock
fail() {
    set +x
    echo "FAIL: $*"
    systemctl --no-pager status netplugin.socket netplugin.service volplugin.service docker.service || true
    journalctl --no-pager -n 150 -u netplugin -u volplugin -u docker || true
    exit 1
}
activate() {  # POST /Plugin.Activate like dockerd; prints the reply
    curl -sS --max-time 120 --unix-socket "$1" -X POST -H 'Accept: application/vnd.docker.plugins.v1.2+json' \
        http://plugin/Plugin.Activate
}
main_pid() { systemctl show -P MainPID "$1"; }

# volplugin without the embedded Ceph cluster (slow under emulation): the LVM backend, no VG needed to serve
mkdir -p /etc/docker-db-plugins
printf 'backends = ["lvm"]\n[volume]\nbackend = "lvm"\n[lvm]\nmonitoring = false\n' \
    >/etc/docker-db-plugins/volplugin.toml
mkdir -p "$PREFIX"
ln -sfn "$REPO/.venv" "$PREFIX/venv"   # the checkout's venv stands in for the one install-service builds

# install-service with systemd running: daemon-reload, enable --now
/usr/bin/python3 "$REPO/scripts/install-service" --skip-venv --prefix "$PREFIX"
for unit in netplugin.socket netplugin.service volplugin.socket volplugin.service; do
    systemctl is-active --quiet "$unit" || fail "$unit is not active after install-service"
    systemctl is-enabled --quiet "$unit" || fail "$unit is not enabled"
done
[ "$(systemctl show -P Type netplugin.service)" = notify ] || fail "Type"
for sock in "$NP" "$VP"; do
    [ -S "$sock" ] && [ "$(stat -c %a "$sock")" = 600 ] || fail "$sock is not a 0600 socket"
done
activate "$NP" | grep NetworkDriver >/dev/null || fail "netplugin does not answer"
activate "$VP" | grep VolumeDriver >/dev/null || fail "volplugin does not answer"

# Not in a mount namespace of their own (volplugin's mounts must reach dockerd).
for svc in netplugin volplugin; do
    pid=$(main_pid $svc.service)
    [ "$(readlink /proc/$pid/ns/mnt)" = "$(readlink /proc/1/ns/mnt)" ] || fail "$svc has its own mount namespace"
done
# netplugin's capability bounding set: chown, dac_override, dac_read_search, fowner, net_admin, net_raw,
# sys_module, sys_admin; volplugin's is not bounded.
grep -q "^CapBnd:[[:space:]]*000000000021300f$" /proc/$(main_pid netplugin.service)/status \
    || fail "netplugin CapBnd: $(grep CapBnd /proc/$(main_pid netplugin.service)/status)"
[ "$(systemctl show -P KillMode volplugin.service)" = process ] || fail "volplugin KillMode"

# The socket is systemd's: a restart keeps it (same inode); a stopped service is started by a request.
inode=$(stat -c %i "$NP")
old=$(main_pid netplugin.service)
systemctl restart netplugin.service
[ "$(main_pid netplugin.service)" != "$old" ] || fail "no restart"
[ "$(stat -c %i "$NP")" = "$inode" ] || fail "restart replaced the socket"
systemctl stop netplugin.service
! systemctl is-active --quiet netplugin.service || fail "netplugin.service still active"
[ "$(stat -c %i "$NP")" = "$inode" ] || fail "the socket went with the service"
activate "$NP" | grep NetworkDriver >/dev/null || fail "no on-demand activation"
systemctl is-active --quiet netplugin.service || fail "the request did not start netplugin.service"
[ "$(stat -c %i "$NP")" = "$inode" ] || fail "activation replaced the socket"

# dockerd through the socket units: a netplugin network on a dummy parent NIC
systemctl start docker.service
ip link add ddpvm0 type dummy
docker network create -d netplugin --ipam-driver netplugin --subnet 10.66.0.0/24 --gateway 10.66.0.1 \
    -o parent=ddpvm0 ddpnet || fail "docker network create through netplugin"
ip -o link show master "npb-$(docker network inspect -f '{{.Id}}' ddpnet | cut -c1-11)" | grep ddpvm0 >/dev/null \
    || fail "no bridge enslaving the parent"

# Boot order: with everything stopped but the sockets, starting dockerd alone brings up both plugins
# first (WantedBy= and Before=docker.service); the network is still served.
systemctl stop docker.service docker.socket netplugin.service volplugin.service
declare -A stopped
for svc in netplugin volplugin; do
    ! systemctl is-active --quiet $svc.service || fail "$svc.service still active"
    stopped[$svc]=$(systemctl show -P InactiveEnterTimestampMonotonic $svc.service)
done
systemctl start docker.service
for svc in netplugin volplugin; do
    systemctl is-active --quiet $svc.service || fail "starting docker.service did not start $svc"
    ready=$(systemctl show -P ActiveEnterTimestampMonotonic $svc.service)
    docker=$(systemctl show -P ExecMainStartTimestampMonotonic docker.service)
    [ "$ready" -gt "${stopped[$svc]}" ] && [ "$ready" -le "$docker" ] \
        || fail "$svc stopped at ${stopped[$svc]}, ready at $ready, dockerd started at $docker"
done
docker network inspect ddpnet >/dev/null || fail "network gone after the restart"
docker network rm ddpnet || fail "docker network rm through netplugin"
ip link del ddpvm0

# Uninstall with systemd running: units stopped, disabled, removed; the sockets go with their units.
systemctl stop docker.service docker.socket
/usr/bin/python3 "$REPO/scripts/install-service" --skip-venv --prefix "$PREFIX" --uninstall
for unit in netplugin.socket netplugin.service volplugin.socket volplugin.service; do
    ! systemctl is-active --quiet "$unit" || fail "$unit still active after --uninstall"
    [ ! -e "/etc/systemd/system/$unit" ] || fail "$unit file left"
done
[ ! -e "$NP" ] && [ ! -e "$VP" ] || fail "sockets left"
rm -rf "$PREFIX" /etc/docker-db-plugins /var/lib/netplugin /var/lib/volplugin
set +x
echo "ALL CHECKS PASSED"
"""

BOOT = r"""
set -e
ip link set lo up
# A fresh /run, and a private /tmp: systemd-tmpfiles-setup empties /tmp at boot (tmp.conf "D /tmp"),
# which would wipe the rest of the VM suite's files.
mount -t tmpfs -o mode=755 tmpfs /run
mount -t tmpfs -o mode=1777 tmpfs /tmp
mkdir -p /run/systemd/system
# Boot-time units that would act on the whole VM (block devices, binfmt, clocks...): masked.
for unit in blk-availability.service lvm2-monitor.service lvm2-lvmpolld.socket systemd-binfmt.service \
        proc-sys-fs-binfmt_misc.automount systemd-pstore.service systemd-timesyncd.service \
        systemd-repart.service systemd-firstboot.service systemd-machine-id-commit.service \
        systemd-tmpfiles-clean.timer; do
    ln -s /dev/null /run/systemd/system/$unit
done
cat >/run/systemd/system/ddp-vmtest.target <<'EOF'
[Unit]
Description=docker-db-plugins host-service checks
Wants=ddp-vmtest.service systemd-journald.socket
EOF
cat >/run/systemd/system/ddp-vmtest.service <<EOF
[Unit]
After=systemd-journald.socket
SuccessAction=exit
FailureAction=exit
[Service]
Type=oneshot
WorkingDirectory=@REPO@
ExecStart=/bin/bash @WORK@/checks.sh
StandardOutput=append:@WORK@/checks.log
StandardError=append:@WORK@/checks.log
TimeoutStartSec=1200
EOF
exec env container=vmlane /lib/systemd/systemd --unit=ddp-vmtest.target --log-target=console \
    --log-level=notice --show-status=no
"""


@pytest.fixture
def workdir(vm):
    """Outside /tmp (private inside the namespaces), in the guest's throwaway overlay."""
    path = Path("/var/lib") / vm.unique("ddp-systemd-")
    path.mkdir(parents=True)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_units_under_systemd(workdir):
    tmp_path = workdir

    def fill(text: str) -> str:
        return text.replace("@REPO@", str(REPO)).replace("@PREFIX@", PREFIX).replace("@WORK@", str(tmp_path))

    (tmp_path / "checks.sh").write_text(fill(CHECKS))
    (tmp_path / "boot.sh").write_text(fill(BOOT))
    (tmp_path / "checks.log").touch()
    proc = subprocess.run(["unshare", "--pid", "--mount", "--net", "--uts", "--kill-child", "--mount-proc",
                           "--propagation", "private", "/bin/sh", str(tmp_path / "boot.sh")],
                          capture_output=True, text=True, timeout=1500)
    log = (tmp_path / "checks.log").read_text() if (tmp_path / "checks.log").exists() else "(no checks.log)"
    report = textwrap.dedent(f"""
        systemd exited {proc.returncode}
        --- checks ---
        {log[-12000:]}
        --- systemd ---
        {proc.stdout[-4000:]}{proc.stderr[-4000:]}""")
    print(report)  # pytest -rP shows it for a passing run too
    assert proc.returncode == 0 and "ALL CHECKS PASSED" in log, report

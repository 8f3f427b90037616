"""Host services: the systemd units (config/systemd/), scripts/install-service into a staging root, and
systemd socket activation of `netplugin serve` / `volplugin serve` for real (an inherited listening
socket on fd 3 with LISTEN_FDS/LISTEN_PID, as systemd passes it). No systemd runs here: nothing is
started through systemctl, and only temporary socket paths and state directories are used."""
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.lab import plugin_post

REPO = Path(__file__).resolve().parents[2]
INSTALL = REPO / "scripts" / "install-service"
SERVICES = ("netplugin", "volplugin")
UNITS = [f"{svc}.{kind}" for svc in SERVICES for kind in ("socket", "service")]
IMPLEMENTS = {"netplugin": ["NetworkDriver", "IpamDriver"], "volplugin": ["VolumeDriver"]}


def install(*args, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(INSTALL), *map(str, args)], capture_output=True, text=True,
                          timeout=600)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}


# --- scripts/install-service -----------------------------------------------------------------------

def test_install_stages_units_and_config_idempotently_and_uninstalls(tmp_path):
    root, prefix = tmp_path / "root", "/opt/ddp-test"
    first = install("--root", root, "--prefix", prefix, "--skip-venv")
    assert "would run: systemctl enable --now netplugin.socket netplugin.service volplugin.socket " \
           "volplugin.service" in first.stdout
    files = tree(root)
    assert sorted(files) == sorted([*(f"etc/systemd/system/{u}" for u in UNITS),
                                    "etc/docker-db-plugins/netplugin.toml", "etc/docker-db-plugins/volplugin.toml"])
    for svc in SERVICES:
        service = files[f"etc/systemd/system/{svc}.service"]
        assert f"ExecStart={prefix}/venv/bin/{svc} serve --config /etc/docker-db-plugins/{svc}.toml\n" in service
        assert "Before=docker.service" in service and f"Requires={svc}.socket" in service
        sock = files[f"etc/systemd/system/{svc}.socket"]
        assert f"ListenStream=/run/docker/plugins/{svc}.sock\n" in sock and "SocketMode=0600" in sock
        assert "@" not in service + sock  # every placeholder substituted
        assert files[f"etc/docker-db-plugins/{svc}.toml"] == (REPO / "config" / f"{svc}.toml").read_text()
        for unit in (f"{svc}.service", f"{svc}.socket"):
            assert stat.S_IMODE(os.stat(root / "etc/systemd/system" / unit).st_mode) == 0o644
    assert "KillMode=process" in files["etc/systemd/system/volplugin.service"]  # mounts outlive the plugin
    assert "KillMode=mixed" in files["etc/systemd/system/netplugin.service"]
    for forbidden in ("ProtectSystem", "PrivateMounts", "PrivateTmp", "PrivateDevices", "ProtectHome"):
        assert f"\n{forbidden}=" not in files["etc/systemd/system/volplugin.service"]

    # Idempotent: a second run changes nothing, and never overwrites an edited configuration.
    conf = root / "etc/docker-db-plugins/volplugin.toml"
    conf.write_text(conf.read_text() + "\n# edited\n")
    edited = tree(root)
    install("--root", root, "--prefix", prefix, "--skip-venv")
    assert tree(root) == edited

    # Uninstall one service, then the other: units go, configuration stays.
    out = install("--root", root, "--prefix", prefix, "--uninstall", "netplugin").stdout
    assert "would run: systemctl disable --now netplugin.service netplugin.socket" in out
    assert not (root / "etc/systemd/system/netplugin.service").exists()
    assert (root / "etc/systemd/system/volplugin.service").exists()
    install("--root", root, "--prefix", prefix, "--uninstall", "all")
    assert sorted(tree(root)) == ["etc/docker-db-plugins/netplugin.toml", "etc/docker-db-plugins/volplugin.toml"]


def test_socket_outside_the_plugin_dir_gets_a_spec_file(tmp_path):
    root = tmp_path / "root"
    (root / "etc/docker-db-plugins").mkdir(parents=True)
    (root / "etc/docker-db-plugins/netplugin.toml").write_text('socket = "/run/netplugin/np-a.sock"\n')
    install("--root", root, "--skip-venv", "netplugin")
    assert (root / "etc/docker/plugins/np-a.spec").read_text() == "unix:///run/netplugin/np-a.sock\n"
    assert "ListenStream=/run/netplugin/np-a.sock\n" in (root / "etc/systemd/system/netplugin.socket").read_text()
    install("--root", root, "--skip-venv", "--uninstall", "netplugin")
    assert not (root / "etc/docker/plugins/np-a.spec").exists()


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze not installed")
def test_installed_units_pass_systemd_analyze_verify(tmp_path):
    """`systemd-analyze verify` loads the units as systemd would (every key known and parsed, ExecStart
    executable, dependencies such as docker.service and network-online.target resolvable); a problem is
    reported on stderr, not always by the exit code. The prefix is a temporary directory with
    stand-in executables (the venv itself is tested below)."""
    root, prefix = tmp_path / "root", tmp_path / "prefix"
    install("--root", root, "--prefix", prefix, "--skip-venv")
    (prefix / "venv/bin").mkdir(parents=True)
    for svc in SERVICES:
        exe = prefix / "venv/bin" / svc
        exe.write_text("#!/bin/sh\n")
        exe.chmod(0o755)
    units = [str(root / "etc/systemd/system" / u) for u in UNITS]
    proc = subprocess.run(["systemd-analyze", "verify", *units], capture_output=True, text=True, timeout=60)
    ours = [line for line in proc.stderr.splitlines() if "netplugin" in line or "volplugin" in line]
    assert proc.returncode == 0 and not ours, proc.stderr


def test_install_builds_a_working_venv(tmp_path):
    """The real thing (but staged): a venv under <root><prefix> with the project and its console scripts."""
    root, prefix = tmp_path / "root", "/opt/ddp-test"
    install("--root", root, "--prefix", prefix, "netplugin")
    venv = root / prefix.lstrip("/") / "venv"
    for svc in SERVICES:
        proc = subprocess.run([str(venv / "bin" / svc), "serve", "--help"], capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 0 and "--socket" in proc.stdout, proc.stderr
    # Rados/rbd come from Debian packages: the venv sees system site-packages.
    assert "include-system-site-packages = true" in (venv / "pyvenv.cfg").read_text()
    install("--root", root, "--prefix", prefix, "netplugin")  # again: an upgrade in place
    install("--root", root, "--prefix", prefix, "--uninstall", "netplugin")
    assert not venv.exists() and not (root / "etc/systemd/system/netplugin.service").exists()


# --- socket activation -----------------------------------------------------------------------------

# Run the rest of argv as this same process with the listening socket on fd 3 and LISTEN_PID set to
# its own PID, exactly what systemd does for a socket-activated service (sd_listen_fds(3)).
LAUNCHER = """
import os, sys
fd = int(os.environ.pop("TEST_LISTEN_FD"))
os.dup2(fd, 3)
if fd != 3:
    os.close(fd)
os.environ.update(LISTEN_FDS="1", LISTEN_PID=str(os.getpid()), LISTEN_FDNAMES="test")
os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
"""


class Activated:
    """A plugin started by this "systemd": the test owns the listening socket, as systemd does."""

    def __init__(self, tmp_path: Path, svc: str, listener: socket.socket):
        self.tmp_path, self.svc, self.listener = tmp_path, svc, listener
        self.socket = listener.getsockname()
        self.log = tmp_path / f"{svc}.log"
        self.proc: subprocess.Popen | None = None
        self.notify: socket.socket | None = None  # Type=notify: systemd's $NOTIFY_SOCKET

    def listen_for_notify(self) -> None:
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(self.tmp_path / "notify"))
        self.notify.settimeout(60)

    def argv(self) -> list[str]:
        args = ["-m", self.svc, "serve", "--socket", self.socket, "--state-dir", str(self.tmp_path / "state")]
        if self.svc == "volplugin":  # no embedded Ceph cluster: the LVM backend only (no VG needed to answer)
            toml = self.tmp_path / "volplugin.toml"
            toml.write_text('backends = ["lvm"]\n[volume]\nbackend = "lvm"\n[lvm]\nmonitoring = false\n')
            args += ["--config", str(toml)]
        return args

    def start(self) -> None:
        env = dict(os.environ, TEST_LISTEN_FD=str(self.listener.fileno()), NETPLUGIN_LABELS="0",
                   PYTHONPATH=str(REPO))
        if self.notify is not None:
            env["NOTIFY_SOCKET"] = self.notify.getsockname()
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen([sys.executable, "-c", LAUNCHER, *self.argv()], cwd=REPO, env=env,
                                         pass_fds=(self.listener.fileno(),), stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def stop(self) -> None:
        """SIGTERM to the main process only (KillMode=mixed/process): gunicorn stops its workers."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            raise AssertionError(f"{self.svc} did not stop on SIGTERM:\n{self.log.read_text()[-3000:]}")
        deadline = time.monotonic() + 15  # then its workers are gone too
        while _group_alive(self.proc.pid):
            assert time.monotonic() < deadline, "workers outlived the gunicorn master"
            time.sleep(0.05)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def _listen(path: Path) -> socket.socket:
    """Listen on ``path`` like a systemd socket unit (SocketMode=0600)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    sock.listen(64)
    return sock


@pytest.mark.parametrize("svc", SERVICES)
def test_socket_activation_serves_the_inherited_socket_and_never_replaces_it(tmp_path, svc):
    path = tmp_path / "run" / f"{svc}.sock"
    path.parent.mkdir()
    listener = _listen(path)
    inode = os.stat(path).st_ino
    plugin = Activated(tmp_path, svc, listener)
    plugin.listen_for_notify()
    try:
        # dockerd may connect before the service runs: the request waits in the backlog (the "socket
        # unit" listens), and is answered once the plugin started on the inherited socket.
        early: dict = {}
        asker = threading.Thread(target=lambda: early.update(reply=plugin_post(path, "/Plugin.Activate",
                                                                               timeout=60)))
        asker.start()
        time.sleep(0.3)
        plugin.start()
        # Type=notify: the gunicorn master (the main PID) tells systemd it is ready.
        assert plugin.notify.recv(4096).decode().startswith("READY=1")
        asker.join(70)
        assert early.get("reply") == (200, {"Implements": IMPLEMENTS[svc]}), plugin.log.read_text()[-3000:]
        assert plugin_post(path, "/Plugin.Activate")[0] == 200
        assert os.stat(path).st_ino == inode and stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert "passed by systemd (socket activation)" in plugin.log.read_text()

        # Stopping the service leaves systemd's socket in place: a request meanwhile waits again,
        # and a restarted plugin (systemctl restart, Restart=on-failure) answers it.
        plugin.stop()
        assert os.stat(path).st_ino == inode
        pending = socket.socket(socket.AF_UNIX)
        pending.settimeout(60)
        pending.connect(str(path))  # accepted by the kernel into the backlog: nobody serves yet
        pending.sendall(b"POST /Plugin.Activate HTTP/1.1\r\nHost: plugin\r\nContent-Length: 0\r\n"
                        b"Connection: close\r\n\r\n")
        plugin.start()
        answer = b""
        while chunk := pending.recv(4096):
            answer += chunk
        pending.close()
        answer = answer.decode()
        assert answer.startswith("HTTP/1.1 200") and "Implements" in answer, answer
        assert os.stat(path).st_ino == inode
    finally:
        plugin.stop()
        listener.close()
        plugin.notify.close()
    assert os.stat(path).st_ino == inode  # the plugin never unlinks what systemd owns


def test_socket_activation_for_another_path_is_refused(tmp_path):
    """A socket unit whose ListenStream= is not the configured socket: a clear error, nothing bound."""
    listener = _listen(tmp_path / "other.sock")
    plugin = Activated(tmp_path, "netplugin", listener)
    plugin.socket = str(tmp_path / "configured.sock")
    try:
        plugin.start()
        assert plugin.proc.wait(60) == 2
    finally:
        plugin.stop()
        listener.close()
    assert "but this plugin is configured for" in plugin.log.read_text()
    assert not (tmp_path / "configured.sock").exists()


@pytest.mark.skipif(not shutil.which("systemd-socket-activate"), reason="systemd-socket-activate not installed")
def test_systemd_socket_activate_starts_netplugin_on_first_connection(tmp_path):
    """systemd's own tool: it listens, and on the first connection execs the service with the socket
    (on-demand activation, as when dockerd connects to a socket unit whose service is not running)."""
    path = tmp_path / "np.sock"
    log = open(tmp_path / "log", "w")
    proc = subprocess.Popen(["systemd-socket-activate", "-l", str(path), "-E", "NETPLUGIN_LABELS=0",
                             "-E", f"PYTHONPATH={REPO}", sys.executable, "-m", "netplugin", "serve",
                             "--socket", str(path), "--state-dir", str(tmp_path / "state")],
                            cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while not path.exists():
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "log").read_text()
            time.sleep(0.02)
        inode = os.stat(path).st_ino
        assert plugin_post(path, "/Plugin.Activate", timeout=60) == (200, {"Implements": IMPLEMENTS["netplugin"]})
        assert os.stat(path).st_ino == inode
        assert "passed by systemd (socket activation)" in (tmp_path / "log").read_text()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # the exec'd gunicorn master, same PID
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()
    assert os.stat(path).st_ino == inode  # gunicorn leaves the socket it did not create

"""Serve a plugin's Flask app under gunicorn (started from Python) on a root-only Unix socket."""
import logging
import os
import signal
import socket
import stat
import sys

from gunicorn.app.base import BaseApplication

from . import logs
from .errors import PluginError

log = logging.getLogger("plugincore.serve")


def setup_logging(level: str, log_format: str = "text") -> None:
    """Called in the master and again in every worker (gunicorn's own lines: logs.gunicorn_logger)."""
    logging.basicConfig(stream=sys.stderr, level=level.upper(), format=logs.TEXT_FORMAT)
    if log_format == "json":
        for handler in logging.getLogger().handlers:
            handler.setFormatter(logs.formatter(log_format))


def claim_socket_path(path: str) -> None:
    """Make ``path`` free to bind: replace a stale socket, refuse to steal a live one or a file."""
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise PluginError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except OSError:
        log.info("removing stale socket %s", path)
        os.unlink(path)
        return
    finally:
        probe.close()
    raise PluginError(f"another process is already serving on {path}")


SD_LISTEN_FDS_START = 3  # sd_listen_fds(3): the first socket systemd passes


def inherited_socket(path: str) -> bool:
    """True when systemd socket activation passed the listening socket for ``path``: $LISTEN_PID is this
    process, $LISTEN_FDS is 1 and fd 3 is a listening Unix stream socket bound to ``path``. gunicorn
    then serves on fd 3 itself (its built-in LISTEN_FDS support) and, knowing systemd owns the socket,
    never unlinks it; nothing here binds or replaces it either, so requests queued on it while the
    plugin (re)started are served. Any other socket passed by systemd is refused with a clear error."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return False
    count = os.environ.get("LISTEN_FDS", "0")
    if count != "1":
        raise PluginError(f"socket activation passed {count} sockets; expected exactly one, for {path}")
    try:
        sock = socket.socket(fileno=os.dup(SD_LISTEN_FDS_START))
    except OSError as exc:
        raise PluginError(f"socket activation: fd {SD_LISTEN_FDS_START} is not a socket ({exc})") from None
    with sock:
        name = sock.getsockname() if sock.family == socket.AF_UNIX else None
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        stream = sock.type == socket.SOCK_STREAM
    try:
        same = bool(name) and os.path.samefile(name, path)
    except OSError:
        same = False
    if not (same and stream and listening):
        raise PluginError(f"socket activation passed {name or 'a socket'} (stream={stream}, "
                          f"listening={bool(listening)}), but this plugin is configured for {path}: "
                          "make ListenStream= of the socket unit the configured socket path")
    return True


class _Gunicorn(BaseApplication):
    def __init__(self, app_factory, options: dict):
        self.app_factory = app_factory
        self.options = options
        super().__init__()

    def load_config(self):
        for key, value in self.options.items():
            if key in self.cfg.settings:  # newer settings are skipped on older gunicorns
                self.cfg.set(key, value)

    def load(self):
        return self.app_factory()


def serve(app_factory, socket_path: str, *, workers: int = 2, threads: int = 4, log_level: str = "info",
          on_ready=None, on_worker=None, name: str = "plugin", log_format: str = "text",
          metrics=None) -> None:
    """Bind ``socket_path`` (mode 0600) at once, run ``on_ready`` in the master before any worker
    starts (requests wait in the listen backlog meanwhile), then serve until SIGTERM/SIGINT.
    ``on_worker`` runs in every worker once it is initialised (e.g. to start a background thread:
    threads must start after the fork, never in the master). Under systemd socket activation
    (``inherited_socket``) the socket systemd listens on is served instead, never replaced."""
    if inherited_socket(socket_path):
        log.info("serving on %s, passed by systemd (socket activation)", socket_path)
    else:
        claim_socket_path(socket_path)
    if metrics is not None:  # a plugincore.metrics.Exporter
        metrics.prepare()

    def when_ready(_arbiter):
        os.chmod(socket_path, 0o600)
        if on_ready is not None:
            _stoppable(on_ready)

    def post_worker_init(worker):
        setup_logging(log_level, log_format)
        if metrics is not None:
            metrics.start(worker.wsgi)
        if on_worker is not None:
            on_worker()

    options = {
        "bind": f"unix:{socket_path}",
        "workers": workers,
        "threads": threads,
        "worker_class": "gthread" if threads > 1 else "sync",
        "umask": 0o177,  # the socket is created 0600: only root may talk to the plugin
        "timeout": 130,  # longer than Docker's own 120 s for the slowest calls
        "graceful_timeout": 8,  # Docker SIGKILLs managed plugins 10 s after SIGTERM
        "when_ready": when_ready,
        "post_worker_init": post_worker_init,
        "child_exit": lambda _arbiter, worker: metrics and metrics.child_exit(worker.pid),
        "loglevel": log_level,
        "logger_class": logs.gunicorn_logger(log_format),
        "errorlog": "-",
        "accesslog": None,
        "proc_name": name,
        # gunicorn >= 25.1 opens a control socket in $HOME shared by every instance: not wanted here.
        "control_socket_disable": True,
    }
    _Gunicorn(app_factory, options).run()


class _StoppedDuringStartUp(BaseException):
    """SIGTERM/SIGINT/SIGQUIT while ``on_ready`` ran (BaseException: no ``except Exception`` swallows it)."""


def _stoppable(on_ready) -> None:
    """Run ``on_ready`` in the master so that a stop signal ends it. gunicorn's handlers only queue signals
    for a main loop that starts after ``when_ready``: a start-up stuck on a hung backend (an lvm command
    waiting for its timeout, a cluster that does not answer) would otherwise ignore systemd's and Docker's
    SIGTERM until it ended. No worker exists yet and every start-up step survives a kill -9, so leaving
    in the middle is safe; a subprocess running meanwhile is killed by plugincore.run on the way out."""
    def stop(signum, _frame):
        raise _StoppedDuringStartUp(signal.Signals(signum).name)

    stop_signals = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)
    queued_by_gunicorn = {s: signal.signal(s, stop) for s in stop_signals}
    try:
        on_ready()
    except _StoppedDuringStartUp as stopped:
        log.warning("stopped by %s during start-up, before serving any request", stopped)
        sys.exit(0)
    finally:
        for s, handler in queued_by_gunicorn.items():
            signal.signal(s, handler)

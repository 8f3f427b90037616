"""Serve a plugin's Flask app under gunicorn (started from Python) on a root-only Unix socket."""
import logging
import os
import socket
import stat
import sys

from gunicorn.app.base import BaseApplication

from .errors import PluginError

log = logging.getLogger("plugincore.serve")


def setup_logging(level: str) -> None:
    logging.basicConfig(stream=sys.stderr, level=level.upper(),
                        format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s")


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
          on_ready=None, on_worker=None, name: str = "plugin") -> None:
    """Bind ``socket_path`` (mode 0600) at once, run ``on_ready`` in the master before any worker
    starts (requests wait in the listen backlog meanwhile), then serve until SIGTERM/SIGINT.
    ``on_worker`` runs in every worker once it is initialised (e.g. to start a background thread:
    threads must start after the fork, never in the master)."""
    claim_socket_path(socket_path)

    def when_ready(_arbiter):
        os.chmod(socket_path, 0o600)
        if on_ready is not None:
            on_ready()

    def post_worker_init(_worker):
        setup_logging(log_level)
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
        "loglevel": log_level,
        "errorlog": "-",
        "accesslog": None,
        "proc_name": name,
        # gunicorn >= 25.1 opens a control socket in $HOME shared by every instance: not wanted here.
        "control_socket_disable": True,
    }
    _Gunicorn(app_factory, options).run()

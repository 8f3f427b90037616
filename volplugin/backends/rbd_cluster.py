"""The RBD backend's connection to Ceph: one cached librados client per process, every call bounded.

- One ``rados.Rados`` per process and cluster identity (conf, client, keyring), re-created after a
  fork (gunicorn forks workers after start-up work; a librados client must never cross a fork).
- A dead cluster gives an error, never a hang: ``client_mount_timeout`` bounds connect (``connect``'s
  own timeout argument is ignored by librados), ``rados_osd_op_timeout``/``rados_mon_op_timeout``
  bound each operation, and every call runs in a helper thread the caller waits for at most
  ``op_timeout`` plus a margin (librbd has retry loops that no Ceph timeout bounds, e.g. requests it
  forwards to a stopped lock owner). A call that overruns drops the cached client; its thread is
  left to finish on its own.
- rados/rbd exceptions become plugincore errors whose message names the volume and pool.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading

from plugincore.errors import BackendError, Conflict, InvalidRequest, NotFound, PluginError

try:  # Debian's python3-rados/python3-rbd (not on PyPI); the venv sees them via system site-packages
    import rados
    import rbd
except ImportError:  # pragma: no cover - exercised on machines without Ceph
    rados = rbd = None

log = logging.getLogger("volplugin.rbd")
MARGIN = 5.0  # seconds a bounded call may overrun op_timeout (librados' own timeouts fire first)

_cache_lock = threading.Lock()
_clients: dict[tuple, tuple[int, object]] = {}  # identity -> (pid, Rados)


def available() -> bool:
    return rados is not None and rbd is not None


def translate(exc: BaseException, what: str, timeout: float) -> PluginError:
    """A rados/rbd exception as the plugincore error to show: ``what`` says what was attempted."""
    if isinstance(exc, PluginError):
        return exc
    if rbd is not None and isinstance(exc, (rbd.ImageNotFound, rados.ObjectNotFound, rbd.ObjectNotFound)):
        return NotFound(f"{what}: not found")
    if rbd is not None and isinstance(exc, (rbd.ImageExists, rados.ObjectExists, rbd.ObjectExists)):
        return Conflict(f"{what}: already exists")
    if rbd is not None and isinstance(exc, (rbd.ImageBusy, rados.ObjectBusy, rbd.ImageHasSnapshots)):
        return Conflict(f"{what}: busy ({exc})")
    if rbd is not None and isinstance(exc, rbd.ReadOnlyImage):
        return Conflict(f"{what}: the image is locked by another client")
    if rbd is not None and isinstance(exc, (rbd.InvalidArgument, rados.InvalidArgumentError,
                                            rbd.ArgumentOutOfRange)):
        return InvalidRequest(f"{what}: invalid argument ({exc})")
    if rbd is not None and isinstance(exc, (rados.TimedOut, rbd.Timeout)) or isinstance(exc, TimeoutError):
        return BackendError(f"{what}: the Ceph cluster did not answer within {timeout:g}s")
    if rbd is not None and isinstance(exc, (rados.PermissionError, rados.PermissionDeniedError,
                                            rbd.PermissionError)):
        return BackendError(f"{what}: permission denied by the Ceph cluster ({exc})")
    if rbd is not None and isinstance(exc, (rbd.NoSpace, rados.NoSpace, rbd.DiskQuotaExceeded)):
        return BackendError(f"{what}: the Ceph cluster is out of space ({exc})")
    return BackendError(f"{what}: {type(exc).__name__}: {exc}")


class Cluster:
    """Access to one pool set of one cluster; hands out pool I/O contexts and runs bounded calls."""

    def __init__(self, *, conf_path: str, client_name: str, keyring: str | None,
                 connect_timeout: float, op_timeout: float, extra_conf: dict | None = None):
        if not available():
            raise BackendError("the Ceph Python bindings are missing: install python3-rados and python3-rbd")
        self.conf_path = conf_path
        self.client_name = client_name
        self.keyring = keyring
        self.connect_timeout = connect_timeout
        self.op_timeout = op_timeout
        self.conf = {
            "client_mount_timeout": str(int(max(1, connect_timeout))),
            "rados_osd_op_timeout": str(int(max(1, op_timeout))),
            "rados_mon_op_timeout": str(int(max(1, op_timeout))),
            "admin_socket": "",  # else a second client in one process logs "File exists"
            "log_to_stderr": "false",
            "err_to_stderr": "false",
            "rbd_default_clone_format": "2",  # clones need no protected snapshot
            **(extra_conf or {}),
        }
        if keyring:
            self.conf["keyring"] = keyring
        self._key = (conf_path, client_name, keyring, tuple(sorted(self.conf.items())))

    # --- the client -----------------------------------------------------------------------------

    def client(self):
        """The connected Rados client of this process (connecting at most connect_timeout)."""
        with _cache_lock:
            entry = _clients.get(self._key)
            if entry is not None and entry[0] == os.getpid():
                return entry[1]
            # after a fork the inherited client is unusable: forget it without touching it
            client = rados.Rados(conffile=self.conf_path, name=self.client_name, conf=dict(self.conf))
            try:
                self.bounded(lambda: client.connect(timeout=self.connect_timeout),
                             self.connect_timeout + MARGIN, "connecting")
            except BaseException as exc:  # noqa: BLE001 - every failure becomes one clear error
                if not isinstance(exc, TimeoutError):  # a stuck connect still uses the client
                    with contextlib.suppress(Exception):
                        client.shutdown()
                reason = translate(exc, "connecting", self.connect_timeout)
                raise BackendError(f"cannot connect to the Ceph cluster of {self.conf_path} as "
                                   f"{self.client_name}: {reason}") from None
            _clients[self._key] = (os.getpid(), client)
            return client

    def drop(self) -> None:
        """Forget the cached client (after an overrun: a stuck call may still be using it)."""
        with _cache_lock:
            entry = _clients.get(self._key)
            if entry is not None and entry[0] == os.getpid():
                del _clients[self._key]

    # --- bounded calls --------------------------------------------------------------------------

    @staticmethod
    def bounded(fn, timeout: float, what: str):
        """``fn()`` in a helper thread; TimeoutError if it has not returned after ``timeout``."""
        box: dict = {}
        done = threading.Event()

        def target():
            try:
                box["value"] = fn()
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
                box["error"] = exc
            finally:
                done.set()

        threading.Thread(target=target, name=f"rbd: {what}"[:60], daemon=True).start()
        if not done.wait(timeout):
            raise TimeoutError(what)
        if "error" in box:
            raise box["error"]
        return box.get("value")

    def call(self, what: str, fn, *, pool: str, timeout: float | None = None):
        """Run ``fn(ioctx)`` on ``pool`` bounded by the op timeout; errors name ``what``. Opening,
        the work and closing all happen in the helper thread: after an overrun the caller must not
        touch an I/O context a stuck call still uses."""
        limit = timeout if timeout is not None else self.op_timeout + MARGIN
        client = self.client()

        def body():
            try:
                ioctx = client.open_ioctx(pool)
            except rados.ObjectNotFound:
                raise NotFound(f"{what}: Ceph pool {pool!r} does not exist") from None
            try:
                return fn(ioctx)
            finally:
                ioctx.close()
        try:
            return self.bounded(body, limit, what)
        except TimeoutError:
            self.drop()
            raise BackendError(f"{what}: no answer from the Ceph cluster within {limit:g}s "
                               "(the operation may still complete)") from None
        except PluginError:
            raise
        except BaseException as exc:  # noqa: BLE001
            raise translate(exc, what, self.op_timeout) from None

    def blocklist(self, address: str, expire: float, what: str) -> None:
        """Fence a client address: the OSDs refuse its I/O and drop its watches."""
        client = self.client()
        try:
            self.bounded(lambda: client.blocklist_add(address, int(expire)), self.op_timeout + MARGIN, what)
        except TimeoutError:
            self.drop()
            raise BackendError(f"{what}: no answer from the Ceph monitors within {self.op_timeout:g}s") from None
        except PluginError:
            raise
        except BaseException as exc:  # noqa: BLE001
            raise translate(exc, what, self.op_timeout) from None

    def cli_args(self) -> list[str]:
        """Identity and timeout arguments for the rbd / rbd-nbd command-line tools."""
        args = ["--conf", self.conf_path, "--name", self.client_name,
                "--client_mount_timeout", self.conf["client_mount_timeout"]]
        if self.keyring:
            args += ["--keyring", self.keyring]
        return args

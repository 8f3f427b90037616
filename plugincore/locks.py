"""Cross-process locks. Gunicorn workers are separate processes, so threading locks are not enough."""
import contextlib
import fcntl
import os
import re
import time

from .errors import Conflict

_SAFE = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")


class LockDir:
    """One flock file per named object under ``path``."""

    def __init__(self, path: str):
        self.path = path
        os.makedirs(path, mode=0o700, exist_ok=True)

    @contextlib.contextmanager
    def hold(self, name: str, timeout: float = 30.0):
        """Hold the lock for ``name``; wait at most ``timeout`` seconds, then refuse (never deadlock)."""
        if not _SAFE.match(name):
            raise ValueError(f"bad lock name {name!r}")
        fd = os.open(os.path.join(self.path, name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise Conflict(f"{name} is busy with another operation; try again") from None
                    time.sleep(0.01)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the flock

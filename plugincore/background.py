"""Background work that must run in exactly one process of a gunicorn pool (a watcher, an agent).

Every worker starts a daemon thread that tries a non-blocking flock; the one that gets it runs the work,
the others poll. When the holder's process dies the kernel drops its lock and another worker takes
over, so the work survives worker restarts without a supervisor of its own. Threads start in the
workers (after the fork), never in the master.
"""
import fcntl
import logging
import os
import threading

log = logging.getLogger("plugincore.background")


def run_elected(name: str, lock_path: str, work, stop: threading.Event | None = None, poll: float = 2.0) -> None:
    """Call ``work(stop)`` in whichever process takes ``lock_path`` first; the others wait their turn."""
    stop = stop or threading.Event()
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        while not stop.is_set():
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                stop.wait(poll)
                continue
            log.info("%s running in pid %d", name, os.getpid())
            try:
                work(stop)
            except Exception:  # noqa: BLE001 - logged; the lock is released and taken again
                log.exception("%s stopped", name)
                fcntl.flock(fd, fcntl.LOCK_UN)
                stop.wait(poll)
    finally:
        os.close(fd)


def start_elected(name: str, lock_path: str, work) -> threading.Thread:
    thread = threading.Thread(target=run_elected, args=(name, lock_path, work), name=name, daemon=True)
    thread.start()
    return thread


def every_interval_with_docker(docker_host: str, interval: float, stop: threading.Event, one_pass) -> None:
    """Until ``stop``: every ``interval`` seconds, ``one_pass(client)`` with a fresh Docker client for
    ``docker_host``. A dockerd that is down or restarting is logged (the first time and every 30th) and
    tried again at the next interval: nothing is done without Docker's answer."""
    import docker

    failures = 0
    while not stop.wait(interval):
        client = None
        try:
            client = docker.DockerClient(base_url=docker_host, timeout=30)
            one_pass(client)
            failures = 0
        except Exception as exc:  # noqa: BLE001 - retried at the next interval
            failures += 1
            if failures == 1 or failures % 30 == 0:
                log.warning("garbage collection: Docker at %s: %s; retrying", docker_host, exc)
        finally:
            if client is not None:
                client.close()

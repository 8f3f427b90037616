"""The one way this project runs a command: argv list, no shell, a timeout, typed errors with stderr."""
import logging
import os
import subprocess

from .errors import BackendError

log = logging.getLogger("plugincore.run")
DEFAULT_TIMEOUT = 30.0


class CommandError(BackendError):
    def __init__(self, argv: list[str], returncode: int | None, stderr: str, reason: str = ""):
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr.strip()
        detail = reason or f"exit status {returncode}"
        super().__init__(f"{argv[0]} failed ({detail}): {self.stderr or 'no error output'}")


class CommandTimeout(CommandError):
    pass


class CommandNotFound(CommandError):
    pass


def _check_argv(argv) -> None:
    # a string is a sequence of str too: "ls -l" would run the program "l"
    if not isinstance(argv, (list, tuple)) or not argv or not all(isinstance(a, str) for a in argv):
        raise TypeError("argv must be a non-empty list of str (never a command line: there is no shell)")


def run(argv: list[str], *, timeout: float = DEFAULT_TIMEOUT, input: str | None = None,
        check: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``argv`` and return the completed process (text output); ``env`` adds variables.

    Raises CommandNotFound, CommandTimeout, or CommandError (non-zero exit when ``check``).
    """
    _check_argv(argv)
    full_env = dict(os.environ, LC_ALL="C", **(env or {}))  # parsable, untranslated messages
    try:
        proc = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout,
                              env=full_env, check=False)
    except FileNotFoundError as exc:
        raise CommandNotFound(argv, None, str(exc), "not installed") from exc
    except subprocess.TimeoutExpired as exc:
        stderr = exc.stderr.decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        raise CommandTimeout(argv, None, stderr, f"timed out after {timeout:g}s") from exc
    if check and proc.returncode != 0:
        raise CommandError(argv, proc.returncode, proc.stderr)
    log.debug("ran %s -> %d", argv, proc.returncode)
    return proc


def spawn(argv: list[str], *, env: dict[str, str] | None = None) -> int:
    """Start a long-lived helper (e.g. rbd-fuse) in its own session so it outlives this process, with
    stdio on /dev/null; ``env`` adds variables. Returns its PID: the caller records it to find the
    process again and reaps it (os.waitpid) if it exits while this process lives."""
    _check_argv(argv)
    full_env = dict(os.environ, LC_ALL="C", **(env or {}))
    actions = [(os.POSIX_SPAWN_OPEN, fd, os.devnull, os.O_RDWR, 0) for fd in (0, 1, 2)]
    # nothing else inherited: a helper holding e.g. the plugin's listening socket would outlive us
    for entry in os.listdir("/proc/self/fd"):
        fd = int(entry)
        if fd > 2:
            try:
                if os.get_inheritable(fd):
                    actions.append((os.POSIX_SPAWN_CLOSE, fd))
            except OSError:
                pass  # the directory listing's own descriptor, already closed
    try:
        pid = os.posix_spawnp(argv[0], argv, full_env, setsid=True, file_actions=actions)
    except FileNotFoundError as exc:
        raise CommandNotFound(argv, None, str(exc), "not installed") from exc
    log.debug("spawned %s as pid %d", argv, pid)
    return pid

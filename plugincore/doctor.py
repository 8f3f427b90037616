"""Shared plumbing of `netplugin doctor` and `volplugin doctor`: the check result, running groups of
checks side by side under a deadline, printing, the exit status, and the probes both plugins share
(root, the plugin's socket, dockerd, the state directory).

A check is OK, WARN (works, but something is degraded or an optional feature is missing) or FAIL
(something the configuration needs is missing or broken); every WARN and FAIL says what is wrong and
how to fix it: the exact command or configuration key. The exit status is 1 if any check failed.
Every probe carries its own timeout; run_groups() adds a deadline over each group as a net beneath
them, so the doctor answers within seconds even when a cluster or a daemon hangs.
"""
from __future__ import annotations

import json
import os
import stat
import tempfile
import threading
import time
from dataclasses import asdict, dataclass

from .client import post
from .errors import PluginError

OK, WARN, FAIL = "OK", "WARN", "FAIL"
PLUGIN_DIR = "/run/docker/plugins"  # where dockerd looks for legacy plugin sockets (hard-coded in it)
SPEC_DIRS = ("/etc/docker/plugins", "/usr/lib/docker/plugins")  # and for spec files naming a socket
PROBE_TIMEOUT = 3.0  # seconds for one socket, HTTP or command probe


@dataclass
class Check:
    name: str  # what was checked
    status: str  # OK | WARN | FAIL
    detail: str = ""  # what was found, or what is missing
    fix: str = ""  # how to fix it: the command to run or the configuration key to set


def ok(name: str, detail: str = "") -> Check:
    return Check(name, OK, detail)


def warn(name: str, detail: str, fix: str = "") -> Check:
    return Check(name, WARN, detail, fix)


def fail(name: str, detail: str, fix: str = "") -> Check:
    return Check(name, FAIL, detail, fix)


def run_groups(groups: list[tuple[str, object]], timeout: float = 8.0) -> list[Check]:
    """Run every group (name, function returning a list of Checks) in a thread of its own, all at
    once, so the slowest probe sets the doctor's duration, not their sum. A group that raised is one
    FAIL naming the error; one still running after ``timeout`` is one FAIL (its thread is a daemon,
    left to finish on its own). Results come in the groups' order."""
    results: dict[int, list[Check]] = {}
    threads = []
    for i, (name, fn) in enumerate(groups):
        def target(i=i, name=name, fn=fn):
            try:
                results[i] = list(fn())
            except Exception as exc:  # noqa: BLE001 - a broken probe is a finding, not a crash
                results[i] = [fail(name, f"the check itself failed: {type(exc).__name__}: {exc}")]
        thread = threading.Thread(target=target, name=f"doctor: {name}"[:60], daemon=True)
        thread.start()
        threads.append(thread)
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    checks = []
    for i, (name, _) in enumerate(groups):
        checks += results.get(i) or [fail(name, f"no answer within {timeout:g}s (a hung daemon or cluster?)")]
    return checks


def exit_status(checks: list[Check]) -> int:
    return 1 if any(c.status == FAIL for c in checks) else 0


def render(checks: list[Check]) -> str:
    """One line per check (status, name, detail), the fix indented below WARN and FAIL lines, and
    a summary line."""
    lines = []
    for c in checks:
        lines.append(f"{c.status:5} {c.name}" + (f": {c.detail}" if c.detail else ""))
        if c.fix and c.status != OK:
            lines.append(f"      fix: {c.fix}")
    counts = {s: sum(c.status == s for c in checks) for s in (OK, WARN, FAIL)}
    lines.append(f"{counts[OK]} ok, {counts[WARN]} warnings, {counts[FAIL]} failed")
    return "\n".join(lines)


def report(checks: list[Check], as_json: bool, out) -> int:
    """Print the checks (text or JSON) and return the exit status."""
    if as_json:
        json.dump({"checks": [asdict(c) for c in checks], "failed": exit_status(checks) == 1}, out, indent=2)
        out.write("\n")
    else:
        out.write(render(checks) + "\n")
    return exit_status(checks)


# ---- probes both plugins share ---------------------------------------------------------------------

def root_check(prog: str) -> Check:
    if os.geteuid() == 0:
        return ok("running as root")
    return fail("running as root", f"running as uid {os.geteuid()}: the plugin and this doctor need root "
                "(netlink, mounts, the root-only socket)", f"sudo {prog} doctor")


def socket_checks(path: str, implements: list[str], start_hint: str, timeout: float = PROBE_TIMEOUT) -> list[Check]:
    """The plugin's socket: where dockerd looks for it, there, a socket, root-only, and a live plugin
    answering /Plugin.Activate with what it should implement."""
    name = f"socket {path}"
    driver = os.path.basename(path).removesuffix(".sock")
    checks = [discovery_check(path, driver)]
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return checks + [fail(name, "does not exist: the plugin is not running", start_hint)]
    except OSError as exc:
        return checks + [fail(name, f"cannot be examined: {exc}", start_hint)]
    if not stat.S_ISSOCK(st.st_mode):
        return checks + [fail(name, "exists but is not a socket", f"remove it (rm {path}), then {start_hint}")]
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077 or st.st_uid != 0:
        # Driving the plugin means mounting and reconfiguring the network: root's business only.
        checks.append(fail(name, f"mode {mode:04o}, owner uid {st.st_uid}: other users can drive the plugin",
                           f"chmod 600 {path}; chown root {path} (the plugin makes it 0600 itself: restart it)"))
    else:
        checks.append(ok(name, f"mode {mode:04o}, owned by root"))
    try:
        reply = post(path, "/Plugin.Activate", {}, timeout=timeout)
    except PluginError as exc:
        text = str(exc)
        if "refused" in text or "No such file" in text:
            return checks + [fail("plugin answers", f"nobody listens on {path} (a stale socket of a plugin that "
                                  "died)", start_hint + " (it replaces the stale socket)")]
        return checks + [fail("plugin answers", f"/Plugin.Activate on {path}: {text}",
                              "look at the plugin's log; restart it if it hangs")]
    have = reply.get("Implements") or []
    missing = [i for i in implements if i not in have]
    if missing:
        return checks + [fail("plugin answers", f"it implements {have}, not {missing}: another plugin on this socket?",
                              "point the socket key of the configuration at this plugin's own socket")]
    return checks + [ok("plugin answers", f"/Plugin.Activate: {', '.join(have)}")]


def discovery_check(path: str, driver: str) -> Check:
    """dockerd finds a legacy plugin by name: /run/docker/plugins/<name>.sock, or a spec file naming the
    socket. Legacy plugins never appear in `docker plugin ls` (that lists managed plugins only)."""
    name = "discovery by dockerd"
    if os.path.dirname(os.path.abspath(path)) == PLUGIN_DIR:
        return ok(name, f"driver name {driver!r} (a legacy plugin: `docker plugin ls` does not list it)")
    for directory in SPEC_DIRS:
        for ext in (".spec", ".json"):
            spec = os.path.join(directory, driver + ext)
            try:
                with open(spec) as f:
                    if path in f.read():
                        return ok(name, f"driver name {driver!r} through {spec}")
            except OSError:
                continue
    return warn(name, f"{path} is outside {PLUGIN_DIR}: dockerd will not find driver {driver!r}",
                f"socket = \"{PLUGIN_DIR}/{driver}.sock\" in the configuration (or a spec file "
                f"{SPEC_DIRS[0]}/{driver}.spec containing unix://{path})")


def docker_client(base_url: str, timeout: float = PROBE_TIMEOUT):
    import docker

    return docker.DockerClient(base_url=base_url, timeout=timeout)


def docker_check(base_url: str, key: str) -> tuple[Check, object]:
    """(check, client or None): dockerd at ``base_url`` answers, with its version and API version.
    ``key`` names how to point at another dockerd (a configuration key or flag)."""
    import docker

    name = f"dockerd at {base_url}"
    fix = f"start dockerd (systemctl start docker), or set {key} to its API"
    if base_url.startswith("unix://") and not os.path.exists(base_url[len("unix://"):]):
        return warn(name, "no such socket: dockerd is not running (or listens elsewhere); nothing will use the "
                    "plugin until it runs", fix), None
    try:
        client = docker_client(base_url)
        version = client.api.version()
    except docker.errors.DockerException as exc:
        return warn(name, f"no answer ({short(exc)}): nothing will use the plugin until dockerd answers", fix), None
    except Exception as exc:  # noqa: BLE001 - requests' errors, a socket timeout...
        return warn(name, f"no answer ({short(exc)})", fix), None
    return ok(name, f"Docker {version.get('Version', '?')}, API {version.get('ApiVersion', '?')}"), client


def short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:200]


def state_dir_check(path: str, key: str) -> Check:
    """The state directory is writable (a file is made and removed there), or can be made."""
    name = f"state directory {path}"
    if not os.path.isdir(path):
        parent = next((p for p in _parents(path) if os.path.exists(p)), "/")
        if not os.path.isdir(parent):
            return fail(name, f"cannot be made: {parent} is not a directory", f"set {key} to a directory")
        if os.access(parent, os.W_OK):
            return ok(name, "does not exist yet: the plugin creates it")
        return fail(name, f"does not exist and {parent} is not writable", f"mkdir -p {path}, or set {key}")
    try:
        with tempfile.NamedTemporaryFile(dir=path, prefix=".doctor-"):
            pass
    except OSError as exc:
        return fail(name, f"not writable: {exc.strerror}", f"fix its permissions or mount (read-only?), or set {key}")
    return ok(name, "writable")


def _parents(path: str):
    path = os.path.abspath(path)
    while path != "/":
        path = os.path.dirname(path)
        yield path


def tool_check(program: str, package: str, why: str, required: bool = True) -> Check:
    """A command the plugin runs is installed."""
    import shutil

    found = shutil.which(program)
    if found:
        return ok(f"tool {program}", found)
    make = fail if required else warn
    return make(f"tool {program}", f"not installed: {why}", f"apt-get install {package}")

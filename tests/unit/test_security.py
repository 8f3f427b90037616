"""Security properties checked mechanically (README: Security): no shell anywhere and one command wrapper,
private state, bounded printable error messages, no credentials echoed. Socket modes are checked where a
plugin is really served (tests/unit/test_serve_and_config.py, tests/e2e quickstart)."""
import ast
import os
import stat
from pathlib import Path

import pytest

from netplugin import config as netconfig
from netplugin.cluster.etcd import parse_endpoints
from netplugin.service import Services
from plugincore.app import MAX_ERROR, printable_message
from plugincore.errors import InvalidRequest
from plugincore.run import run

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("plugincore", "netplugin", "volplugin")
WRAPPER = REPO / "plugincore" / "run.py"


def _sources():
    for package in PACKAGES:
        yield from sorted((REPO / package).rglob("*.py"))


def test_no_shell_and_commands_only_through_the_wrapper():
    offences = []
    for path in _sources():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            where = f"{path.relative_to(REPO)}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.keyword) and node.arg == "shell":
                offences.append(f"{where} shell=")
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "os" \
                    and node.attr in ("system", "popen", "execv", "execvp", "execl", "spawnl", "spawnv"):
                offences.append(f"{where} os.{node.attr}")
            names = [a.name for a in node.names] if isinstance(node, (ast.Import, ast.ImportFrom)) else []
            module = node.module if isinstance(node, ast.ImportFrom) else None
            if ("subprocess" in names or module == "subprocess" or "pty" in names) and path != WRAPPER:
                offences.append(f"{where} imports subprocess/pty outside plugincore/run.py")
    assert offences == []


def test_the_wrapper_refuses_a_command_line_string():
    with pytest.raises(TypeError):
        run("ls -l /")
    with pytest.raises(TypeError):
        run(["ls", 5])


def test_state_directory_and_database_are_private(tmp_path):
    state = tmp_path / "state"
    Services(netconfig.load(overrides={"state_dir": str(state)}, environ={}))
    assert stat.S_IMODE(os.stat(state).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(state / "netplugin.db").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(state / "locks").st_mode) == 0o700


def test_etcd_credentials_are_refused_without_being_echoed():
    for endpoints in ("http://root:hunter2@10.0.0.1:2379", "hunter2@10.0.0.1:2379",
                      "http://10.0.0.2:2379,https://u:hunter2@[fd00::1]:2379"):
        with pytest.raises(InvalidRequest) as caught:
            parse_endpoints(endpoints)
        assert "hunter2" not in str(caught.value) and "not supported" in str(caught.value)


def test_error_messages_are_one_bounded_printable_line():
    message = printable_message("bad name '" + "x" * 100_000 + "\x00\n\x1b[31m'")
    assert message.isprintable() and len(message) < MAX_ERROR + 50
    assert printable_message("a\nb\x00c") == "a\\nb\\x00c"
    assert printable_message("") == "unknown error"
    assert printable_message("名前 ü") == "名前 ü"  # printable unicode stays as it is

"""Protocol fuzzing of a served plugin (hypothesis): requests as Docker would never send them, straight to
the plugin's Unix socket, and the checks every answer must pass.

A request is a route (the plugin's own, and unknown ones) and a body that is one of: raw bytes, JSON that is
not an object, or an object whose known fields carry the wrong types, odd names (path traversal, 16+
character interface names, unicode, NUL, shell syntax, empty), huge values and extra fields, next to
well-formed values (so that some requests get deep into validation, and a few even succeed).

``Fuzzer.check(route, body)`` sends one request and asserts: the reply is JSON in Docker's content type,
an error has both keys with the same non-empty printable message, and no answer is an internal error
(HTTP 500: an exception the plugin did not expect). Successful calls are recorded for ``undo``.
Request count: FUZZ_REQUESTS (the CI default is small; bench/fuzz.sh runs 10,000 per plugin).
"""
from __future__ import annotations

import json
import os
import sqlite3

from hypothesis import strategies as st

from . import PLUGIN_ACCEPT, UnixHTTPConnection

CI_REQUESTS = 600
LONG_REQUESTS = 10_000
HEX = "0123456789abcdef"

ODD_STRINGS = [
    "", " ", ".", "..", "../../../etc/passwd", "/etc/shadow", "a/b", "a\\b", "-rf", "--help", "$(reboot)",
    "`id`", "; rm -rf /", "|cat", "a b", "eth0", "lo", "eth1", "x" * 15, "y" * 16, "z" * 300, "np" + "0" * 14,
    "ünïcödé", "名前", "\u202ereversed", "\x00", "nul\x00byte", "new\nline", "tab\tx", "%s%n%x", "{}", "null",
    "0", "-1", "4294967296", "1e309", "NaN", "true", "com.docker.network.generic", "local/10.0.0.0/8",
    "global/::/0", "10.0.0.1/33", "10.0.0.0/24", "300.1.1.1", "::ffff:10.0.0.1", "fe80::1%eth0",
    "0.0.0.0/0", "a" * 64, "A" * 64, HEX * 4, "g" * 64, "ff:ff:ff:ff:ff:ff", "00:00:00:00:00:00",
    "1G", "0", "-5G", "999999999999T", "ext4", "xfs", "btrfs", "rbd", "lvm", "volplugin", "pgdata",
]


def hex_id() -> st.SearchStrategy[str]:
    return st.text(alphabet=HEX, min_size=64, max_size=64)


def _scalars() -> st.SearchStrategy:
    return st.one_of(
        st.none(), st.booleans(), st.integers(min_value=-(2 ** 70), max_value=2 ** 70),
        st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(ODD_STRINGS), st.text(max_size=40),
        hex_id(), st.just("9" * 5000), st.just("x" * 70_000))


def values() -> st.SearchStrategy:
    """Any JSON value, biased to the odd ones, nested a little."""
    return st.recursive(_scalars(), lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.one_of(st.sampled_from(ODD_STRINGS), st.text(max_size=10)),
                                                     inner, max_size=4)), max_leaves=8)


def bodies(fields: dict[str, st.SearchStrategy]) -> st.SearchStrategy:
    """Request bodies for routes that know ``fields`` ({name: strategy of well-formed values})."""
    def field_value(name):
        return st.one_of(fields[name], values())
    objects = st.fixed_dictionaries({}, optional={name: field_value(name) for name in fields}).flatmap(
        lambda known: st.dictionaries(st.text(max_size=12), values(), max_size=3).map(
            lambda extra: {**extra, **known}))
    return st.one_of(
        objects, objects, objects,  # mostly objects: those reach validation
        st.binary(max_size=200),
        values().filter(lambda v: not isinstance(v, dict)).map(lambda v: json.dumps(v).encode()),
        st.sampled_from([b"", b"{", b"{}", b"[]", b"null", b'{"a":', b"\xff\xfe", b'"\\ud800"', b"1" * 100_000]))


def requests(routes: list[str], fields: dict[str, st.SearchStrategy],
             valid: dict[str, st.SearchStrategy] | None = None) -> st.SearchStrategy:
    """(route, body) pairs. ``valid``: {route: strategy of well-formed bodies}, sent for a third of the
    requests, so that sequences of them create, use and delete real objects between the odd ones."""
    unknown = st.sampled_from(["/NetworkDriver.Nope", "/VolumeDriver.Nope", "/IpamDriver.", "/", "/..",
                               "/Plugin.Activate/x", "/%00"])
    route = st.one_of(st.sampled_from(routes), st.sampled_from(routes), unknown)
    odd = st.tuples(route, bodies(fields))
    if not valid:
        return odd
    good = st.sampled_from(sorted(valid)).flatmap(lambda r: st.tuples(st.just(r), valid[r]))
    return st.one_of(odd, odd, good)


def as_object(body) -> dict:
    """The JSON object the plugin saw in ``body`` ({} when there is none, as it treats such bodies)."""
    if isinstance(body, bytes):
        try:
            body = json.loads(body)
        except ValueError:
            return {}
    return body if isinstance(body, dict) else {}


def encode(body) -> bytes:
    return body if isinstance(body, bytes) else json.dumps(body).encode()


class Fuzzer:
    """Sends requests to ``socket``; ``successes`` lists (route, body, reply) of the 200s, in order."""

    def __init__(self, socket, snapshot=None):
        self.socket = socket
        self.snapshot = snapshot  # () -> the plugin's state: a refused request must leave it as it was
        self.sent = 0
        self.errors = 0
        self.successes: list[tuple[str, dict, dict]] = []
        self.statuses: dict[int, int] = {}
        self.samples: dict[str, set[str]] = {}  # route -> a few of its error messages, for the report

    def post(self, route: str, body) -> tuple[int, dict]:
        status, headers, raw = _post(self.socket, route, encode(body))
        self.sent += 1
        self.statuses[status] = self.statuses.get(status, 0) + 1
        assert headers.get("content-type") == "application/vnd.docker.plugins.v1.2+json", (route, headers)
        reply = json.loads(raw)
        assert isinstance(reply, dict), (route, raw[:200])
        return status, reply

    def check(self, route: str, body) -> tuple[int, dict]:
        before = self.snapshot() if self.snapshot else None
        status, reply = self.post(route, body)
        shown = repr(body)[:300]
        assert status != 500, f"{route} {shown} -> internal error: {reply}"
        if status == 200:
            assert "Err" not in reply or not reply["Err"], (route, shown, reply)
            self.successes.append((route, as_object(body), reply))
        else:
            self.errors += 1
            message = reply.get("Err")
            seen = self.samples.setdefault(route, set())
            if len(seen) < 4 and isinstance(message, str):
                seen.add(message[:160])
            assert message and message == reply.get("Error"), f"{route} {shown} -> {status} {reply}"
            assert message.isprintable() and "Traceback" not in message, (route, shown, message)
            if self.snapshot:
                assert self.snapshot() == before, f"{route} {shown} was refused ({message}) but changed state"
        return status, reply

    def summary(self) -> str:
        succeeded: dict[str, int] = {}
        for route, _, _ in self.successes:
            succeeded[route] = succeeded.get(route, 0) + 1
        return (f"{self.sent} requests: {self.errors} refused, {len(self.successes)} succeeded "
                f"{dict(sorted(succeeded.items()))}, statuses {dict(sorted(self.statuses.items()))}")


def _post(socket, route: str, data: bytes) -> tuple[int, dict, bytes]:
    """POST raw ``data`` (which may be anything) as dockerd would: Docker's Accept, no Content-Type."""
    conn = UnixHTTPConnection(socket, 60)
    try:
        conn.request("POST", route, body=data, headers={"Accept": PLUGIN_ACCEPT})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def sqlite_snapshot(path):
    """() -> every row of every table of the SQLite database ``path``, read without writing to it."""
    def snapshot() -> dict:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
        try:
            tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
            return {t: sorted(map(repr, db.execute(f'SELECT * FROM "{t}"'))) for t in tables}
        finally:
            db.close()
    return snapshot


def request_count() -> int:
    return int(os.environ.get("FUZZ_REQUESTS", CI_REQUESTS))



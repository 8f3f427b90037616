"""etcd v3 as the multi-host control plane's store, through its JSON gateway (etcd3gw's client).

Everything the hosts share is a JSON value under one key prefix; every read-check-write is one etcd
transaction that compares the revisions it read (optimistic concurrency: a loser re-reads and tries
again), so two hosts never hand out the same address or VNI. Callers see two kinds of failure: a
``ClusterUnavailable`` (no endpoint answered: nothing was changed, or it is safe to retry) and a
``BackendError`` for anything else etcd refused.

The watch is read here rather than through etcd3gw's watcher, whose thread swallows a broken stream:
a watch that ends (idle timeout, etcd restart, compaction) must tell the caller to re-read everything.
"""
from __future__ import annotations

import base64
import json
import logging
import urllib.parse
from dataclasses import dataclass
from typing import Any, Iterator

import requests
from etcd3gw import exceptions as etcd_errors
from etcd3gw.client import Etcd3Client

from plugincore.errors import BackendError, Conflict, InvalidRequest

log = logging.getLogger("netplugin.etcd")
API = "/v3/"  # etcd >= 3.4; fixed, so no discovery request at start


def optimistic(attempt, what: str, tries: int = 20):
    """Run ``attempt()`` -> (done, result) until done: each try re-reads and compares revisions in its
    transaction, so it only fails when another host changed the same keys meanwhile. A bounded number
    of tries, then a Conflict (never a livelock)."""
    for _ in range(tries):
        done, result = attempt()
        if done:
            return result
    raise Conflict(f"{what}: too much concurrent change in the cluster store; try again")


class ClusterUnavailable(BackendError):
    """No etcd endpoint answered in time."""


class WatchLost(Exception):
    """The watch stream ended or fell behind a compaction: re-read and watch again."""


@dataclass(frozen=True)
class Kv:
    key: str  # relative to the store's prefix
    value: Any  # decoded JSON (None for keys_only reads)
    mod_revision: int
    create_revision: int
    lease: int = 0


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _unb64(text: str) -> str:
    return base64.b64decode(text).decode()


def prefix_end(prefix: str) -> str:
    """The smallest key greater than every key starting with ``prefix`` (etcd's range_end)."""
    raw = bytearray(prefix.encode())
    raw[-1] += 1
    return raw.decode()


def redact_userinfo(url: str) -> str:
    """``http://user:secret@host`` -> ``http://***@host``."""
    scheme, sep, rest = url.rpartition("://")
    return f"{scheme}{sep}***@{rest.rpartition('@')[2]}" if "@" in rest else url


def parse_endpoints(text: str) -> list[tuple[str, str, int]]:
    """``http://10.0.0.1:2379,http://10.0.0.2:2379`` -> [(scheme, host, port)]."""
    found = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        url = urllib.parse.urlsplit(item)
        if "@" in item:  # said without the password: error messages end up in logs
            raise InvalidRequest(f"etcd endpoint {redact_userinfo(item)!r} carries credentials: etcd "
                                 "authentication is not supported; keep etcd on a private network")
        if url.scheme not in ("http", "https") or not url.hostname or url.path not in ("", "/"):
            raise InvalidRequest(f"etcd endpoint {item!r} is not like http://HOST:PORT")
        found.append((url.scheme, url.hostname, url.port or 2379))
    if not found:
        raise InvalidRequest("no etcd endpoints configured (cluster.etcd_endpoints)")
    return found


class Etcd:
    def __init__(self, endpoints: str, prefix: str = "/netplugin/", timeout: float = 5.0):
        if not prefix.startswith("/") or not prefix.endswith("/"):
            raise InvalidRequest(f"etcd key prefix {prefix!r} must start and end with '/'")
        self.prefix = prefix
        self.timeout = timeout
        self.endpoints = [f"{scheme}://{host}:{port}" for scheme, host, port in parse_endpoints(endpoints)]
        self._clients = [Etcd3Client(host=host, port=port, protocol=scheme, timeout=timeout, api_path=API)
                         for scheme, host, port in parse_endpoints(endpoints)]
        self._current = 0  # the endpoint that answered last; tried first

    # ---- requests ------------------------------------------------------------------------

    def _call(self, path: str, body: dict) -> dict:
        errors = []
        for step in range(len(self._clients)):
            index = (self._current + step) % len(self._clients)
            client = self._clients[index]
            try:
                reply = client.post(client.get_url(path), json=body)
            except (etcd_errors.ConnectionFailedError, etcd_errors.ConnectionTimeoutError) as exc:
                errors.append(f"{self.endpoints[index]}: {type(exc).__name__}")
                continue
            except etcd_errors.Etcd3Exception as exc:
                raise BackendError(f"etcd refused {path}: {exc.detail_text or exc}") from None
            self._current = index
            return reply
        raise ClusterUnavailable(f"cluster store unreachable (etcd {', '.join(errors)}); try again when "
                                 "etcd is back")

    def _key(self, key: str) -> str:
        return _b64(self.prefix + key)

    def _kv(self, raw: dict, keys_only: bool = False) -> Kv:
        key = _unb64(raw["key"])[len(self.prefix):]
        value = None
        if not keys_only and raw.get("value"):
            value = json.loads(base64.b64decode(raw["value"]))
        return Kv(key, value, int(raw.get("mod_revision", 0)), int(raw.get("create_revision", 0)),
                  int(raw.get("lease", 0)))

    def get(self, key: str) -> Kv | None:
        reply = self._call("kv/range", {"key": self._key(key)})
        kvs = reply.get("kvs") or []
        return self._kv(kvs[0]) if kvs else None

    def range(self, prefix: str, keys_only: bool = False) -> tuple[list[Kv], int]:
        """Every key under ``prefix`` in key order, and the store revision they were read at."""
        full = self.prefix + prefix
        reply = self._call("kv/range", {"key": _b64(full), "range_end": _b64(prefix_end(full)),
                                        "keys_only": keys_only})
        return ([self._kv(raw, keys_only) for raw in reply.get("kvs") or []],
                int(reply["header"]["revision"]))

    def txn(self, compare: list[dict], success: list[dict], failure: list[dict] = ()) -> bool:
        """All of ``success`` if every comparison holds, else ``failure``; True if it held."""
        reply = self._call("kv/txn", {"compare": compare, "success": success, "failure": list(failure)})
        return bool(reply.get("succeeded"))

    def put(self, key: str, value, lease: int = 0) -> None:
        self._call("kv/put", self.op_put(key, value, lease)["request_put"])

    def delete(self, key: str) -> None:
        self._call("kv/deleterange", {"key": self._key(key)})

    # ---- transaction building blocks ------------------------------------------------------

    def absent(self, key: str) -> dict:
        return {"key": self._key(key), "target": "CREATE", "result": "EQUAL", "create_revision": 0}

    def unchanged(self, kv: Kv) -> dict:
        """The key still has the revision ``kv`` was read at (it was not changed or deleted since)."""
        return {"key": self._key(kv.key), "target": "MOD", "result": "EQUAL", "mod_revision": kv.mod_revision}

    def same_revision(self, key: str, mod_revision: int) -> dict:
        """Like unchanged(), also for a key that did not exist (revision 0) and must still not."""
        if mod_revision == 0:
            return self.absent(key)
        return {"key": self._key(key), "target": "MOD", "result": "EQUAL", "mod_revision": mod_revision}

    def same_incarnation(self, kv: Kv) -> dict:
        """The key still exists as the one read (not deleted and created anew since); its value may
        have changed."""
        return {"key": self._key(kv.key), "target": "CREATE", "result": "EQUAL",
                "create_revision": kv.create_revision}

    def op_put(self, key: str, value, lease: int = 0) -> dict:
        body = {"key": self._key(key), "value": _b64(json.dumps(value, sort_keys=True))}
        if lease:
            body["lease"] = lease
        return {"request_put": body}

    def op_delete(self, key: str) -> dict:
        return {"request_delete_range": {"key": self._key(key)}}

    def op_delete_prefix(self, prefix: str) -> dict:
        full = self.prefix + prefix
        return {"request_delete_range": {"key": _b64(full), "range_end": _b64(prefix_end(full))}}

    # ---- leases ----------------------------------------------------------------------------

    def lease_grant(self, ttl: int) -> int:
        return int(self._call("lease/grant", {"TTL": ttl})["ID"])

    def lease_keepalive(self, lease: int) -> int:
        """Renew; the remaining TTL in seconds, or 0 if the lease has already expired."""
        reply = self._call("lease/keepalive", {"ID": lease})
        return max(int((reply.get("result") or {}).get("TTL", 0)), 0)

    def lease_revoke(self, lease: int) -> None:
        try:
            self._call("kv/lease/revoke", {"ID": lease})
        except BackendError as exc:
            if "not found" not in str(exc):  # already expired: what revoking wanted
                raise

    # ---- watch -----------------------------------------------------------------------------

    def watch(self, prefix: str, start_revision: int, idle_timeout: float = 30.0) -> Iterator[tuple[str, Kv]]:
        """(``"put"`` | ``"delete"``, Kv) for every change under ``prefix`` from ``start_revision``.
        Returns after ``idle_timeout`` seconds without news (the caller re-reads, a cheap safety net
        against a silently dead connection); raises WatchLost when the stream breaks or etcd has
        compacted past ``start_revision``, ClusterUnavailable when no endpoint accepts the watch."""
        full = self.prefix + prefix
        body = {"create_request": {"key": _b64(full), "range_end": _b64(prefix_end(full)),
                                   "start_revision": start_revision}}
        client = self._clients[self._current]
        try:
            response = client.session.post(client.get_url("watch"), json=body, stream=True,
                                            timeout=(self.timeout, idle_timeout))
        except requests.exceptions.RequestException as exc:
            raise ClusterUnavailable(f"cannot watch etcd at {self.endpoints[self._current]}: {exc}") from None
        buffer = b""
        try:
            for chunk in response.iter_content(chunk_size=None):
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    if line.strip():
                        yield from self._watch_events(json.loads(line))
        except requests.exceptions.ConnectionError as exc:
            if isinstance(exc.__context__, TimeoutError) or "timed out" in str(exc).lower():
                return  # idle: nothing changed for idle_timeout seconds
            raise WatchLost(f"watch stream broke: {exc}") from None
        except requests.exceptions.RequestException as exc:
            raise WatchLost(f"watch stream broke: {exc}") from None
        finally:
            response.close()
        raise WatchLost("etcd ended the watch stream")

    def _watch_events(self, message: dict) -> Iterator[tuple[str, Kv]]:
        result = message.get("result") or {}
        if "error" in message:
            raise WatchLost(f"etcd watch error: {message['error']}")
        if result.get("compact_revision") and int(result["compact_revision"]) > 0:
            raise WatchLost(f"etcd compacted past the watch start (revision {result['compact_revision']})")
        if result.get("canceled"):
            raise WatchLost(f"etcd canceled the watch: {result.get('cancel_reason', '')}")
        for event in result.get("events") or []:
            kind = "delete" if event.get("type") == "DELETE" else "put"
            yield kind, self._kv(event["kv"], keys_only=kind == "delete")

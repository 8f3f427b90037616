"""Talking to a running plugin over its Unix socket, as the admin commands do (`netplugin shape`)."""
import http.client
import json
import socket

from .errors import BackendError, Conflict, InvalidRequest, NotFound


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


def post(socket_path: str, endpoint: str, body: dict, timeout: float = 30.0) -> dict:
    """POST ``body`` as JSON; the reply dict. A plugin error comes back as the matching PluginError
    (NotFound 404, InvalidRequest 400, Conflict 409, else BackendError) carrying its message."""
    conn = _UnixConnection(socket_path, timeout)
    try:
        try:
            conn.request("POST", endpoint, body=json.dumps(body), headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            raw = response.read()
        except OSError as exc:
            raise BackendError(f"cannot talk to the plugin on {socket_path}: {exc}") from None
    finally:
        conn.close()
    try:
        reply = json.loads(raw) if raw.strip() else {}
    except ValueError:
        raise BackendError(f"the plugin on {socket_path} answered {response.status} with no JSON") from None
    if response.status >= 400 or reply.get("Err"):
        message = reply.get("Err") or reply.get("Error") or f"HTTP {response.status}"
        kind = {404: NotFound, 400: InvalidRequest, 409: Conflict}.get(response.status, BackendError)
        raise kind(message)
    return reply

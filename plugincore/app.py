"""Flask app factory with Docker's plugin wire format.

Docker sends every call as a POST without a Content-Type and sometimes with an empty body, and reads
errors from ``Err`` (network, volume) or ``Error`` (IPAM, libnetwork#1613): we always set both.
"""
import json
import logging
import time

from flask import Flask, Response, g, request
from werkzeug.exceptions import HTTPException

from . import logs, metrics
from .errors import PluginError

CONTENT_TYPE = "application/vnd.docker.plugins.v1.2+json"
log = logging.getLogger("plugincore.app")
_LINE_HEAD = ("method", "endpoint", "status", "duration_ms")  # already in the message's fixed part


def reply(payload: dict, status: int = 200) -> Response:
    return Response(json.dumps(payload), status=status, content_type=CONTENT_TYPE)


MAX_ERROR = 1000  # characters of an error message; callers' values can be huge


def printable_message(message: str) -> str:
    """``message`` as one printable line of bounded length: errors echo what the caller sent (paths,
    names, option values), which may hold control characters or megabytes."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in message or "unknown error")
    if len(text) > MAX_ERROR:
        text = f"{text[:MAX_ERROR]}... ({len(text) - MAX_ERROR} more characters)"
    return text


def error_reply(message: str, status: int) -> Response:
    message = printable_message(message)
    return reply({"Err": message, "Error": message}, status)


def request_body() -> dict:
    """The JSON object Docker sent, or {} for an empty/invalid/non-object body."""
    body = request.get_json(force=True, silent=True)
    return body if isinstance(body, dict) else {}


def create_app(name: str, implements: list[str], blueprints, services: dict) -> Flask:
    """Build a plugin app.

    ``services`` are attached as ``app.extensions[name]`` so handlers reach the driver without globals,
    and tests can pass their own.
    """
    app = Flask(name)
    app.extensions.update(services)

    @app.post("/Plugin.Activate")
    def activate():
        return reply({"Implements": implements})

    for bp in blueprints:
        app.register_blueprint(bp)

    @app.before_request
    def _start_clock():
        g.started = time.monotonic()

    @app.after_request
    def _log_request(response):
        # One line per request: what it was about (the IDs in its body), how it ended, how long it took.
        seconds = time.monotonic() - g.get("started", time.monotonic())
        status = response.status_code
        error = g.get("error")
        fields = {"method": request.method, "endpoint": request.path, "status": status,
                  "duration_ms": round(seconds * 1000, 1), **logs.request_ids(request_body())}
        if error is not None:
            fields["error"] = error
        # Docker probes with Get before every create: a 404 is routine, not worth a warning.
        level = logging.INFO if status < 400 or status == 404 else logging.WARNING
        detail = logs.as_text({k: v for k, v in fields.items() if k not in _LINE_HEAD})
        log.log(level, "%s %s %d %.1fms%s", request.method, request.path, status, seconds * 1000,
                f" {detail}" if detail else "", extra={"fields": fields})
        # The route's rule, not the path: an unknown path must not become a new time series.
        metrics.observe_request(request.url_rule.rule if request.url_rule else "unknown", status, seconds,
                                g.get("error_type"))
        return response

    def _failed(exc_type: str, message: str) -> None:
        g.error_type, g.error = exc_type, message

    @app.errorhandler(PluginError)
    def _plugin_error(exc: PluginError):
        _failed(exc.__class__.__name__, str(exc))  # logged with the request's line
        return error_reply(str(exc), exc.status)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        # An unknown route must stay a 404 (Docker treats it as "not implemented"), but in our format.
        _failed(f"HTTP{exc.code}", exc.name)
        return error_reply(f"{exc.name}: {request.path}", exc.code or 500)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        log.exception("%s crashed", request.path)
        _failed("internal", f"{exc.__class__.__name__}: {exc}")
        return error_reply(f"internal error in {name}: {exc.__class__.__name__}: {exc}", 500)

    return app

"""Flask app factory with Docker's plugin wire format.

Docker sends every call as a POST without a Content-Type and sometimes with an empty body, and reads
errors from ``Err`` (network, volume) or ``Error`` (IPAM, libnetwork#1613): we always set both.
"""
import json
import logging
import time

from flask import Flask, Response, g, request
from werkzeug.exceptions import HTTPException

from .errors import PluginError

CONTENT_TYPE = "application/vnd.docker.plugins.v1.2+json"
log = logging.getLogger("plugincore.app")


def reply(payload: dict, status: int = 200) -> Response:
    return Response(json.dumps(payload), status=status, content_type=CONTENT_TYPE)


def error_reply(message: str, status: int) -> Response:
    message = message or "unknown error"
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
        took = (time.monotonic() - g.get("started", time.monotonic())) * 1000
        log.info("%s %s %d %.1fms", request.method, request.path, response.status_code, took)
        return response

    @app.errorhandler(PluginError)
    def _plugin_error(exc: PluginError):
        # Docker probes with Get before every create: a 404 is routine, not worth a warning.
        log.log(logging.INFO if exc.status == 404 else logging.WARNING, "%s failed: %s", request.path, exc)
        return error_reply(str(exc), exc.status)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        # An unknown route must stay a 404 (Docker treats it as "not implemented"), but in our format.
        return error_reply(f"{exc.name}: {request.path}", exc.code or 500)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        log.exception("%s crashed", request.path)
        return error_reply(f"internal error in {name}: {exc.__class__.__name__}: {exc}", 500)

    return app

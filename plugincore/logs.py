"""Log formats (``log_format`` = "text" | "json") and the fields of the one log line per request.

JSON lines are for log shippers: one object per line, and a request's fields (endpoint, IDs, status,
duration, error) are separate keys instead of something to parse out of the message.
"""
import datetime
import json
import logging
import string

from .errors import InvalidRequest

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"
# The request fields that name what a call is about, in the order the log line shows them.
ID_KEYS = ("NetworkID", "EndpointID", "PoolID", "Pool", "Address", "Name", "ID", "Endpoint")
SHORT_ID = 12  # Docker's short form of its 64-hex-digit IDs
MAX_VALUE = 64  # a log line must stay a line, whatever a caller sends
_HEX = frozenset(string.hexdigits)


def check_format(value: str) -> str:
    if value not in LOG_FORMATS:
        raise InvalidRequest(f"log_format {value!r}: choose from {', '.join(LOG_FORMATS)}")
    return value


def formatter(log_format: str) -> logging.Formatter:
    return JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)


def short(value: str) -> str:
    """Docker's long hex IDs as their first 12 characters; other values capped at MAX_VALUE."""
    if len(value) > SHORT_ID and set(value) <= _HEX:
        return value[:SHORT_ID]
    return value if len(value) <= MAX_VALUE else value[:MAX_VALUE] + "..."


def request_ids(body: dict) -> dict:
    """The identifying fields a request body carries (strings only), shortened."""
    return {key: short(body[key]) for key in ID_KEYS if isinstance(body.get(key), str) and body[key]}


def as_text(fields: dict) -> str:
    """`key=value ...`, quoting values that contain spaces, quotes or control characters."""
    parts = []
    for key, value in fields.items():
        value = str(value)
        if not value or not value.isprintable() or any(c in value for c in ' "='):
            value = json.dumps(value)
        parts.append(f"{key}={value}")
    return " ".join(parts)


class JsonFormatter(logging.Formatter):
    """time, level, logger, pid, message, then the record's ``fields`` (``extra={"fields": {...}}``)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
            .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        for key, value in (getattr(record, "fields", None) or {}).items():
            entry.setdefault(key, value)  # the fixed keys above win over a clashing field
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def gunicorn_logger(log_format: str):
    """gunicorn's logger class for ``log_format``: gunicorn logs through handlers of its own, made
    before any hook of ours runs ("Starting gunicorn ..."), so JSON must be set up in them."""
    from gunicorn.glogging import Logger

    if log_format != "json":
        return Logger

    class JsonLogger(Logger):
        def setup(self, cfg):
            super().setup(cfg)
            for handler in self.error_log.handlers:
                handler.setFormatter(JsonFormatter())

    return JsonLogger

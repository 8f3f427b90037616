"""Type-checked access to fields of a Docker request body (any field may be missing or null)."""
from .errors import InvalidRequest


def text(body: dict, key: str, required: bool = False) -> str:
    value = body.get(key)
    if value is None or value == "":
        if required:
            raise InvalidRequest(f"{key} is required")
        return ""
    if not isinstance(value, str):
        raise InvalidRequest(f"{key} must be a string, got {type(value).__name__}")
    if len(value) > 4096:
        raise InvalidRequest(f"{key} is too long ({len(value)} characters)")
    return value


def mapping(body: dict, key: str) -> dict:
    value = body.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidRequest(f"{key} must be an object, got {type(value).__name__}")
    return value


def sequence(body: dict, key: str) -> list:
    value = body.get(key)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise InvalidRequest(f"{key} must be a list of objects")
    return value


def flag(body: dict, key: str) -> bool:
    value = body.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidRequest(f"{key} must be true or false, got {type(value).__name__}")
    return value

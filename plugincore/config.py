"""Configuration: built-in defaults < TOML file < environment < command-line flags.

Environment variables are ``<PREFIX>_<KEY>`` for top-level keys and ``<PREFIX>_<SECTION>_<KEY>`` for
keys in a section (``NETPLUGIN_IPAM_DEFAULT_SUPERNET``). Values are converted to the default's type.
"""
import copy
import os
import tomllib

from .errors import InvalidRequest


def _convert(value: str, default, name: str):
    if isinstance(default, bool):
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise InvalidRequest(f"{name}: expected a boolean, got {value!r}")
    if isinstance(default, int):
        try:
            return int(value)
        except ValueError:
            raise InvalidRequest(f"{name}: expected an integer, got {value!r}") from None
    if isinstance(default, float):
        return float(value)
    if isinstance(default, list):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


def _merge(base: dict, override: dict, where: str) -> None:
    for key, value in override.items():
        if key not in base:
            raise InvalidRequest(f"{where}: unknown configuration key {key!r}")
        if isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise InvalidRequest(f"{where}: {key!r} must be a table")
            _merge(base[key], value, where)
        else:
            base[key] = value


def load(defaults: dict, prefix: str, path: str | None = None, overrides: dict | None = None,
         environ=None) -> dict:
    environ = os.environ if environ is None else environ
    config = copy.deepcopy(defaults)
    path = path or environ.get(f"{prefix}_CONFIG")
    if path:
        try:
            with open(path, "rb") as f:
                _merge(config, tomllib.load(f), path)
        except OSError as exc:
            raise InvalidRequest(f"cannot read configuration {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise InvalidRequest(f"{path}: {exc}") from None
    for key, default in defaults.items():
        if isinstance(default, dict):
            for sub, sub_default in default.items():
                name = f"{prefix}_{key}_{sub}".upper()
                if name in environ:
                    config[key][sub] = _convert(environ[name], sub_default, name)
        else:
            name = f"{prefix}_{key}".upper()
            if name in environ:
                config[key] = _convert(environ[name], default, name)
    _merge(config, {k: v for k, v in (overrides or {}).items() if v is not None}, "command line")
    return config

"""Typed errors. Every error a handler raises becomes one Docker-style reply in app.py."""


class PluginError(Exception):
    """Base class: the message is shown to the Docker user, so it must say what is wrong."""

    status = 500

    def __init__(self, message: str):
        # Docker treats an empty error string as success (calicoctl#963): never allow one.
        super().__init__(message or self.__class__.__name__)


class InvalidRequest(PluginError):
    """Bad input from the caller: nothing was changed."""

    status = 400


class NotFound(PluginError):
    status = 404


class Conflict(PluginError):
    """The request clashes with existing state (address in use, parent already claimed...)."""

    status = 409


class BackendError(PluginError):
    """The kernel, a command or a storage backend failed."""

    status = 500

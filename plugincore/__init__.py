"""Plumbing shared by netplugin and volplugin.

Docker's plugin transport (content type, error keys, tolerant JSON parsing), serving a Flask app under
gunicorn on a root-only Unix socket, configuration loading, the SQLite state store with cross-process
locking, and the one subprocess wrapper. Nothing here knows about networks or volumes.
"""

"""Docker volume plugin routes. No backend yet: volumes cannot be created, and the routes that act on
a volume answer with a clear error instead of a 404 (which Docker would misread)."""
from flask import Blueprint

from plugincore.app import reply, request_body
from plugincore.errors import NotFound, PluginError
from plugincore.fields import text

bp = Blueprint("volplugin", __name__)
NO_BACKEND = "volplugin has no storage backend yet (RBD and LVM backends are not implemented)"


@bp.post("/VolumeDriver.Capabilities")
def capabilities():
    return reply({"Capabilities": {"Scope": "global"}})


@bp.post("/VolumeDriver.List")
def list_volumes():
    return reply({"Volumes": [], "Err": ""})


@bp.post("/VolumeDriver.Get")
@bp.post("/VolumeDriver.Path")
def get_volume():
    raise NotFound(f"volume {text(request_body(), 'Name', True)!r} does not exist")


@bp.post("/VolumeDriver.Remove")
@bp.post("/VolumeDriver.Unmount")
def release():
    return reply({"Err": ""})  # releasing what does not exist is a success


@bp.post("/VolumeDriver.Create")
@bp.post("/VolumeDriver.Mount")
def not_available():
    raise PluginError(NO_BACKEND)

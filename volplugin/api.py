"""HTTP routes of the Docker volume plugin protocol; see
../shared/reference/docker-volume-plugin-protocol.md. Handlers only parse, call and serialise."""
from flask import Blueprint, current_app

from plugincore.app import reply, request_body
from plugincore.fields import text

bp = Blueprint("volplugin", __name__)
OK = {"Err": ""}


def _driver():
    return current_app.extensions["volplugin.driver"]


def _opts(body: dict):
    opts = body.get("Opts")  # null for `-v name:/path` of a volume that does not exist yet
    return opts if opts is not None else {}


@bp.post("/VolumeDriver.Capabilities")
def capabilities():
    # "global" with a shared backend (RBD: a volume lives in the cluster, Docker on every host sees the
    # same one); "local" when every configured backend is host-local (LVM).
    return reply({"Capabilities": {"Scope": _driver().scope}})


@bp.post("/VolumeDriver.Create")
def create():
    body = request_body()
    _driver().create(text(body, "Name", True), _opts(body))
    return reply(OK)


@bp.post("/VolumeDriver.Remove")
def remove():
    _driver().remove(text(request_body(), "Name", True))
    return reply(OK)


@bp.post("/VolumeDriver.Mount")
def mount():
    body = request_body()
    return reply({"Mountpoint": _driver().mount(text(body, "Name", True), text(body, "ID", True)), "Err": ""})


@bp.post("/VolumeDriver.Unmount")
def unmount():
    body = request_body()
    _driver().unmount(text(body, "Name", True), text(body, "ID"))
    return reply(OK)


@bp.post("/VolumeDriver.Path")
def path():
    return reply({"Mountpoint": _driver().path(text(request_body(), "Name", True)), "Err": ""})


@bp.post("/VolumeDriver.Get")
def get():
    return reply({"Volume": _driver().get(text(request_body(), "Name", True)), "Err": ""})


@bp.post("/VolumeDriver.List")
def list_volumes():
    return reply({"Volumes": _driver().list(), "Err": ""})

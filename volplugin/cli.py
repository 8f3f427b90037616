"""`volplugin serve`: the volume plugin (protocol skeleton; backends come later)."""
import argparse
import sys

from plugincore import config as _config
from plugincore.app import create_app
from plugincore.errors import PluginError
from plugincore.serve import serve, setup_logging

DEFAULTS = {
    "socket": "/run/docker/plugins/volplugin.sock",
    "state_dir": "/var/lib/volplugin",
    "workers": 2,
    "threads": 4,
    "log_level": "info",
}


def build_app():
    from .api import bp
    return create_app("volplugin", ["VolumeDriver"], [bp], {})


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="volplugin")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("serve", help="serve the Docker volume plugin on its Unix socket")
    run.add_argument("--config", help="TOML file (default: $VOLPLUGIN_CONFIG, else built-in defaults)")
    run.add_argument("--socket")
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    args = parser.parse_args(argv)
    try:
        config = _config.load(DEFAULTS, "VOLPLUGIN", args.config,
                              {"socket": args.socket, "log_level": args.log_level})
        setup_logging(config["log_level"])
        serve(build_app, config["socket"], workers=config["workers"], threads=config["threads"],
              log_level=config["log_level"], name="volplugin")
    except PluginError as exc:
        print(f"volplugin: {exc}", file=sys.stderr)
        sys.exit(2)

"""`volplugin serve` (the Docker volume plugin) and admin commands: status, snapshot, grow, break-lock."""
import argparse
import json
import logging
import sys

from plugincore.errors import PluginError
from plugincore.serve import serve, setup_logging
from . import config as volconfig

log = logging.getLogger("volplugin")


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="TOML file (default: $VOLPLUGIN_CONFIG, else built-in defaults)")
    common.add_argument("--state-dir", help="where state, mounts and the embedded cluster live")
    common.add_argument("--host-id", help="this host's identity in volume locks (default: hostname)")
    parser = argparse.ArgumentParser(prog="volplugin", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("serve", parents=[common], help="serve the Docker volume plugin on its Unix socket")
    run.add_argument("--socket", help="socket path; Docker's driver name is its basename")
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    status = sub.add_parser("status", parents=[common], help="volumes, holders, mounts, snapshots")
    status.add_argument("--json", action="store_true")
    snap = sub.add_parser("snapshot", parents=[common], help="create|list|rollback|remove snapshots")
    snap.add_argument("action", choices=["create", "list", "rollback", "remove"])
    snap.add_argument("target", help="<volume>@<snapshot> (just <volume> for list)")
    grow = sub.add_parser("grow", parents=[common], help="grow a volume and its mounted filesystem")
    grow.add_argument("volume")
    grow.add_argument("size", help="new size, e.g. 40G")
    brk = sub.add_parser("break-lock", parents=[common],
                         help="fence a dead host (blocklist its clients) and break its lock on a volume")
    brk.add_argument("volume")
    return parser


def main(argv=None) -> None:
    args = _parser().parse_args(argv)
    try:
        config = volconfig.load(args.config, {"state_dir": args.state_dir, "host_id": args.host_id,
                                              "socket": getattr(args, "socket", None),
                                              "log_level": getattr(args, "log_level", None)})
        if args.command == "serve":
            _serve(config)
        else:
            setup_logging("warning")
            _admin(config, args)
    except PluginError as exc:
        print(f"volplugin: {exc}", file=sys.stderr)
        sys.exit(2)


def _serve(config: dict) -> None:
    from .reconcile import reconcile
    from .service import Services, create_app, embedded_cluster

    setup_logging(config["log_level"])

    def on_ready():
        # After the socket listens (Docker gives managed plugins ~10 s), before any request is served.
        try:
            if not config["rbd"]["conf"]:
                embedded_cluster(config).ensure_running()
            reconcile(Services(config).driver)
        except Exception:  # noqa: BLE001 - keep serving: requests then fail with clear errors
            log.exception("start-up (cluster or reconciliation) failed")

    serve(lambda: create_app(config), config["socket"], workers=config["workers"], threads=config["threads"],
          log_level=config["log_level"], on_ready=on_ready, name="volplugin")


def _admin(config: dict, args) -> None:
    from .admin import Admin
    from .service import Services

    admin = Admin(Services(config).driver)
    if args.command == "status":
        rows = admin.status()
        if args.json:
            print(json.dumps(rows, indent=2))
            return
        print(f"{'VOLUME':24}{'SIZE':>14}  {'FS':6}{'HOLDER':16}{'MOUNTPOINT':40}SNAPSHOTS")
        for r in rows:
            st = r.get("Status", {})
            snaps = ",".join(s["name"] for s in r.get("Snapshots", []))
            print(f"{r['Name']:24}{st.get('size', ''):>14}  {st.get('fs', ''):6}{r.get('Holder', '') or '-':16}"
                  f"{r.get('Mountpoint', '') or '-':40}{snaps or r.get('Error', '')}")
    elif args.command == "snapshot":
        volume, _, snap = args.target.partition("@")
        if args.action == "list":
            for s in admin.snapshot_list(volume):
                print(f"{volume}@{s['name']}\t{s.get('size', '')}\t{s.get('created', '')}")
            return
        getattr(admin, f"snapshot_{args.action}")(volume, snap)
        print(f"{args.action}: {volume}@{snap}")
    elif args.command == "grow":
        print(f"{args.volume}: {admin.grow(args.volume, args.size)} bytes")
    elif args.command == "break-lock":
        holder = admin.break_lock(args.volume)
        print(f"{args.volume}: lock of {holder.host if holder else 'nobody'} broken")

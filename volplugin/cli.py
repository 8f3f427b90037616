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
    setup = sub.add_parser("lvm-setup", parents=[common],
                           help="create the LVM volume group and thin pool ([lvm] vg, thin_pool) if missing")
    setup.add_argument("--device", action="append", default=[], help="a block device for the volume group")
    setup.add_argument("--loop-file", help="trials: a sparse file behind a loop device (default [lvm] loop_file)")
    setup.add_argument("--size", help="size of a new loop file, e.g. 50G")
    setup.add_argument("--pool-percent", type=int, default=90, help="share of the VG's free space for the pool")
    teardown = sub.add_parser("lvm-teardown", parents=[common],
                              help="remove the LVM volume group (refused while a volume is in use)")
    teardown.add_argument("--loop-file", help="detach this file's loop device (default [lvm] loop_file)")
    teardown.add_argument("--remove-file", action="store_true", help="also delete the loop file")
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
            if "rbd" in config["backends"] and not config["rbd"]["conf"]:
                embedded_cluster(config).ensure_running()
            if "lvm" in config["backends"] and config["lvm"]["loop_file"]:
                from .backends.lvm_setup import ensure_loop
                ensure_loop(config["lvm"]["loop_file"])  # loop devices do not survive a reboot
            reconcile(Services(config).driver)
        except Exception:  # noqa: BLE001 - keep serving: requests then fail with clear errors
            log.exception("start-up (cluster or reconciliation) failed")

    serve(lambda: create_app(config), config["socket"], workers=config["workers"], threads=config["threads"],
          log_level=config["log_level"], on_ready=on_ready, name="volplugin")


def _lvm_admin(config: dict, args) -> None:
    from .backends import lvm_setup
    from .backends.lvm_command import Lvm
    from .options import parse_size

    lvm = Lvm(timeout=config["lvm"]["timeout"], monitoring=config["lvm"]["monitoring"])
    vg, pool = config["lvm"]["vg"], config["lvm"]["thin_pool"]
    loop_file = args.loop_file or config["lvm"]["loop_file"]
    if args.command == "lvm-setup":
        size = parse_size(args.size) if args.size else None
        created = lvm_setup.setup(lvm, vg, pool, devices=args.device, loop_file=loop_file, size=size,
                                  pool_percent=args.pool_percent)
        print(f"{vg}/{pool}: " + (", ".join(k for k, v in created.items() if v) + " created"
                                  if any(created.values()) else "already set up"))
    else:
        lvm_setup.teardown(lvm, vg, loop_file=loop_file, remove_file=args.remove_file)
        print(f"{vg}: removed")


def _admin(config: dict, args) -> None:
    from .admin import Admin
    from .service import Services

    if args.command.startswith("lvm-"):
        _lvm_admin(config, args)
        return
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
        for pool in admin.pools():
            where = f"thin pool {pool['vg']}/{pool['thin_pool']}"
            if "error" in pool:
                print(f"{where}: {pool['error']}")
                continue
            print(f"{where}: data {pool['data_percent']:g}%, metadata {pool['metadata_percent']:g}%, "
                  f"provisioned {pool['overcommit']:g}x of {pool['size']} bytes")
            if "warning" in pool:
                print(f"WARNING: {pool['warning']}")
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

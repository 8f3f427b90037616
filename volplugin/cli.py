"""`volplugin serve` (the Docker volume plugin) and admin commands: status, doctor, snapshot, grow, break-lock."""
import argparse
import json
import logging
import os
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
    status = sub.add_parser("status", parents=[common],
                            help="volumes (size, use, holder, containers, snapshots, mounts), thin pools, and "
                                 "drift between this host's state and the kernel or backend")
    status.add_argument("--json", action="store_true")
    doctor = sub.add_parser("doctor", parents=[common],
                            help="check this host, the backends and the running plugin: OK/WARN/FAIL with fixes; "
                                 "exit 1 on FAIL")
    doctor.add_argument("--json", action="store_true")
    doctor.add_argument("--socket", help="the plugin's socket (default: the configured one)")
    doctor.add_argument("--docker-host", default=None,
                        help="Docker API to check (default: $DOCKER_HOST, else unix:///run/docker.sock)")
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
    from plugincore.metrics import exporter_for
    from .metrics import collectors
    from .reconcile import reconcile
    from .service import Services, create_app, embedded_cluster

    setup_logging(config["log_level"], config["log_format"])

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

    def on_worker():
        if config["docker_host"] and config["gc_interval"] > 0:  # mounts a cut-off Mount reply left
            from plugincore.background import start_elected
            from .docker_gc import VolumeGC
            start_elected("docker gc", os.path.join(config["state_dir"], "docker-gc.lock"), VolumeGC(
                Services(config).driver, config["docker_host"], config["gc_interval"], config["gc_grace"]).run)

    serve(lambda: create_app(config), config["socket"], workers=config["workers"], threads=config["threads"],
          log_level=config["log_level"], on_ready=on_ready, on_worker=on_worker, name="volplugin",
          log_format=config["log_format"],
          metrics=exporter_for(config, "volplugin", collectors))


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
    if args.command == "doctor":  # before Services: the doctor creates nothing and connects to nothing first
        _doctor(config, args)
        return
    admin = Admin(Services(config).driver)
    if args.command == "status":
        from .status import collect, render
        report = collect(admin.driver, admin)
        if args.json:
            print(json.dumps(report, indent=2, default=str))
        else:
            render(report)
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


def _doctor(config: dict, args) -> None:
    import os

    from plugincore.doctor import report
    from .doctor import checks

    docker_host = args.docker_host or os.environ.get("DOCKER_HOST") or "unix:///run/docker.sock"
    sys.exit(report(checks(config, docker_host), args.json, sys.stdout))

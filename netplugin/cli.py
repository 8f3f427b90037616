"""`netplugin serve`, `status`, `doctor`, `shape` and `reclaim`."""
import argparse
import json
import os
import logging
import sys

from plugincore.errors import InvalidRequest, PluginError
from plugincore.serve import serve, setup_logging
from . import config as netconfig

log = logging.getLogger("netplugin")


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="TOML file (default: $NETPLUGIN_CONFIG, else built-in defaults)")
    common.add_argument("--state-dir", help="where state and locks live")
    parser = argparse.ArgumentParser(prog="netplugin", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("serve", parents=[common], help="serve the Docker plugin on its Unix socket")
    run.add_argument("--socket", help="socket path; Docker's driver name is its basename")
    run.add_argument("--workers", type=int)
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    status = sub.add_parser("status", parents=[common],
                            help="networks, endpoints, pools and cluster from the plugin's state, checked against "
                                 "the kernel (drift) and named by Docker when it answers")
    status.add_argument("--json", action="store_true")
    status.add_argument("--docker-host", default=None,
                        help="Docker API for network and container names (default: docker_host; '' = none)")
    doctor = sub.add_parser("doctor", parents=[common],
                            help="check this host and the running plugin: OK/WARN/FAIL with fixes; exit 1 on FAIL")
    doctor.add_argument("--json", action="store_true")
    doctor.add_argument("--socket", help="the plugin's socket (default: the configured one)")
    doctor.add_argument("--docker-host", default=None, help="Docker API to check (default: docker_host)")
    shape = sub.add_parser("shape", parents=[common],
                           help="change a running container's rate limits now (the admin override)")
    shape.add_argument("target", help="container name or ID (resolved through Docker), or endpoint ID prefix")
    shape.add_argument("--egress", help="outbound limit, tc units (50mbit)")
    shape.add_argument("--ingress", help="inbound limit, tc units")
    shape.add_argument("--clear", action="store_true", help="drop the override: label/option/network rates apply")
    shape.add_argument("--socket", help="the plugin's socket (default: the configured one)")
    shape.add_argument("--docker-host", default=None,
                       help="Docker API to resolve container names (default: $DOCKER_HOST or /run/docker.sock)")
    reclaim = sub.add_parser("reclaim", parents=[common],
                             help="give back what a dead host held in the cluster store (addresses, pool and "
                                  "overlay memberships, published endpoints)")
    reclaim.add_argument("--host", required=True, help="the dead host's cluster.host_id")
    reclaim.add_argument("--force", action="store_true",
                         help="even if the host's liveness record is still there (it expires host_ttl "
                              "seconds after its plugin stopped)")
    return parser


def main(argv=None) -> None:
    args = _parser().parse_args(argv)
    try:
        config = netconfig.load(args.config, {"state_dir": args.state_dir,
                                              "socket": getattr(args, "socket", None),
                                              "workers": getattr(args, "workers", None),
                                              "log_level": getattr(args, "log_level", None)})
        if args.command == "serve":
            _serve(config)
        elif args.command == "shape":
            _shape(config, args)
        elif args.command == "reclaim":
            _reclaim(config, args.host, args.force)
        elif args.command == "doctor":
            _doctor(config, args)
        else:
            _status(config, args)
    except PluginError as exc:
        print(f"netplugin: {exc}", file=sys.stderr)
        sys.exit(2)


def _serve(config: dict) -> None:
    from plugincore.metrics import exporter_for
    from .metrics import collectors
    from .reconcile import reconcile
    from .service import Services, create_app

    setup_logging(config["log_level"], config["log_format"])

    def on_ready():
        try:
            reconcile(Services(config).driver)
        except Exception:  # noqa: BLE001 - keep serving: a dead plugin hangs dockerd (libnetwork#813)
            log.exception("start-up reconciliation failed")

    def on_worker():
        from plugincore.background import start_elected
        services = Services(config)
        locks = os.path.join(config["state_dir"], "locks")
        if services.etcd is not None:  # overlays span hosts: keep the forwarding tables current
            from .overlay_agent import OverlayAgent
            start_elected("overlay agent", os.path.join(locks, "overlay-agent.lock"), OverlayAgent(services).run)
        if config["docker_host"] and config["gc_interval"] > 0:  # what crashes left that Docker forgot
            from .docker_gc import DockerGC
            from .ipam import Ipam
            local_ipam = services.ipam if isinstance(services.ipam, Ipam) else None  # not the shared one
            start_elected("docker gc", os.path.join(locks, "docker-gc.lock"), DockerGC(
                services.driver, config["docker_host"], config["gc_interval"], config["gc_grace"],
                ipam=local_ipam).run)
        if config["labels"]:  # rates from container labels, read from Docker's events
            from .label_watcher import LabelWatcher
            start_elected("label watcher", os.path.join(locks, "label-watcher.lock"),
                          LabelWatcher(services.driver, config["docker_host"]).run)

    serve(lambda: create_app(config), config["socket"], workers=config["workers"],
          threads=config["threads"], log_level=config["log_level"], on_ready=on_ready, on_worker=on_worker,
          name="netplugin", log_format=config["log_format"],
          metrics=exporter_for(config, "netplugin", collectors))


def _shape(config: dict, args) -> None:
    """Post the change to the running plugin (it owns the kernel state and its locks). A target that is
    no endpoint of this plugin is looked up as a container in Docker, here in the CLI: a plugin request
    handler never calls back into Docker."""
    from plugincore.client import post
    from plugincore.errors import NotFound

    body = {"Egress": args.egress or "", "Ingress": args.ingress or "", "Clear": args.clear}
    socket_path = args.socket or config["socket"]
    try:
        results = [post(socket_path, "/NetPlugin.Shape", {"Endpoint": args.target, **body})]
    except (NotFound, InvalidRequest) as exc:
        endpoints = _container_endpoints(args.target, args.docker_host)
        if endpoints is None:
            raise exc from None
        results = []
        for endpoint_id in endpoints:
            try:
                results.append(post(socket_path, "/NetPlugin.Shape", {"Endpoint": endpoint_id, **body}))
            except NotFound:
                continue  # an endpoint of another driver
        if not results:
            raise NotFound(f"container {args.target} has no endpoint on this plugin's networks") from None
    for r in results:
        print(f"endpoint {r['Endpoint'][:12]}: egress {r['egress'] or 'unlimited'}, "
              f"ingress {r['ingress'] or 'unlimited'}")


def _container_endpoints(target: str, docker_host: str | None) -> list[str] | None:
    """Endpoint IDs of a container's networks, or None if Docker does not know such a container."""
    import docker

    client = None
    try:
        client = docker.DockerClient(base_url=docker_host) if docker_host else docker.from_env()
        attrs = client.api.inspect_container(target)
    except docker.errors.NotFound:
        return None
    except docker.errors.DockerException as exc:
        raise InvalidRequest(f"cannot ask Docker about container {target}: {exc}") from None
    finally:
        if client is not None:
            client.close()
    networks = (attrs.get("NetworkSettings") or {}).get("Networks") or {}
    return [n["EndpointID"] for n in networks.values() if n.get("EndpointID")]


def _reclaim(config: dict, host: str, force: bool) -> None:
    from .service import Services

    services = Services(config)
    if services.etcd is None:
        raise InvalidRequest("reclaim is for a shared cluster store (cluster.store = \"etcd\"); "
                             "this configuration keeps everything on this host")
    if host in services.overlays.live_hosts() and not force:
        raise InvalidRequest(f"host {host} looks alive (its liveness record is in the store); stop its "
                             "plugin and wait host_ttl seconds, or pass --force")
    summary = {**services.ipam.reclaim(host), **services.overlays.reclaim(host)}
    print(f"reclaimed from {host}: {summary['addresses']} address references, {summary['pools']} pools, "
          f"{summary['memberships']} overlay memberships, {summary['endpoints']} published endpoints")


def _status(config: dict, args) -> None:
    from .service import Services
    from .status import collect, render

    docker_host = config["docker_host"] if args.docker_host is None else args.docker_host
    report = collect(Services(config), docker_host)
    if args.json:
        json.dump(report, sys.stdout, indent=2, default=str)
        print()
    else:
        render(report)


def _doctor(config: dict, args) -> None:
    from plugincore.doctor import report
    from .doctor import checks

    sys.exit(report(checks(config, args.docker_host), args.json, sys.stdout))

"""``cistern-operator``: run the WriteCache operator (kopf) with the standard credentials."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence

import kopf

from cistern.operator.handlers import build_registry
from cistern.operator.kubeapi import load_credentials
from cistern.operator.settings import OperatorSettings

__all__ = ["main", "parse_args"]

logger = logging.getLogger(__name__)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    defaults = OperatorSettings()
    parser = argparse.ArgumentParser(
        prog="cistern-operator",
        description="Reconcile WriteCache resources into cache daemons, StorageClasses, status "
                    "and drain guards. Credentials: in-cluster service account, else "
                    "KUBECONFIG or ~/.kube/config.")
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("--namespace", "-n", action="append", metavar="NS",
                       help="serve WriteCaches in this namespace (repeatable)")
    scope.add_argument("--all-namespaces", "-A", action="store_true",
                       help="serve WriteCaches in every namespace (the default)")
    parser.add_argument("--standalone", action="store_true",
                        help="do not coordinate with other operator replicas (kopf peering)")
    env = os.environ.get
    parser.add_argument("--daemon-image", default=env("CISTERN_DAEMON_IMAGE",
                                                      defaults.daemon_image),
                        help="image of the node daemon (env CISTERN_DAEMON_IMAGE)")
    parser.add_argument("--daemon-image-pull-policy",
                        default=env("CISTERN_DAEMON_IMAGE_PULL_POLICY",
                                    defaults.daemon_image_pull_policy),
                        choices=["Always", "IfNotPresent", "Never"])
    parser.add_argument("--guard-image", default=env("CISTERN_GUARD_IMAGE", defaults.guard_image),
                        help="image of the drain-guard pods (env CISTERN_GUARD_IMAGE)")
    parser.add_argument("--mount-root", default=env("CISTERN_MOUNT_ROOT", defaults.mount_root),
                        help="host directory of the FUSE mounts, shared with the CSI driver")
    parser.add_argument("--fuse-holder-dir", default=env("CISTERN_FUSE_HOLDER_DIR", ""),
                        help="host directory of the FUSE holder's socket (the chart's CSI node "
                             "plugin runs the holder); '' for no holder (docs/restarts.md)")
    parser.add_argument("--control-port", type=int, default=defaults.control_port,
                        help="port of the daemons' control API")
    parser.add_argument("--status-interval", type=float, default=defaults.status_interval,
                        help="seconds between status polls of the daemons")
    parser.add_argument("--priority-class", default=defaults.priority_class_name,
                        help="priority class of the daemon pods ('' for none)")
    parser.add_argument("--workload-namespace",
                        default=env("POD_NAMESPACE", defaults.workload_namespace),
                        help="the operator's own namespace, where the privileged daemons run "
                             "(env POD_NAMESPACE)")
    parser.add_argument("--allowed-node-selector-key", action="append", metavar="KEY",
                        dest="allowed_node_selector_keys",
                        help="a node label key WriteCaches may select on (repeatable; "
                             "default: any)")
    parser.add_argument("--allow-control-plane", action="store_true",
                        help="let WriteCaches place daemons on control-plane nodes")
    parser.add_argument("--max-drain-timeout", type=float, default=defaults.max_drain_timeout,
                        metavar="SECONDS", help="largest drain.timeout a WriteCache may set")
    parser.add_argument("--finalizer-timeout", type=float, default=defaults.finalizer_timeout,
                        metavar="SECONDS", help="how long a deletion waits past the drain "
                        "timeout before it gives up (keeping the data)")
    parser.add_argument("--no-bucket-check", action="store_true",
                        help="do not probe the bucket before rolling out a spec")
    parser.add_argument("--log-format", choices=["plain", "full", "json"], default="json",
                        help="log format (default json: one structured record per line)")
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    parser.add_argument("--liveness", metavar="URL", default=None,
                        help="serve kopf's liveness probe, e.g. http://0.0.0.0:8080/healthz")
    return parser.parse_args(argv)


def settings_from_args(args: argparse.Namespace) -> OperatorSettings:
    return OperatorSettings(
        daemon_image=args.daemon_image,
        daemon_image_pull_policy=args.daemon_image_pull_policy,
        guard_image=args.guard_image,
        mount_root=args.mount_root,
        fuse_holder_dir=args.fuse_holder_dir or None,
        control_port=args.control_port,
        status_interval=args.status_interval,
        priority_class_name=args.priority_class or None,
        check_object_store=not args.no_bucket_check,
        workload_namespace=args.workload_namespace,
        # "--allowed-node-selector-key=" alone: no key is allowed.
        allowed_node_selector_keys=tuple(k for k in args.allowed_node_selector_keys if k)
        if args.allowed_node_selector_keys is not None else None,
        forbid_control_plane=not args.allow_control_plane,
        max_drain_timeout=args.max_drain_timeout,
        finalizer_timeout=args.finalizer_timeout,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    kopf.configure(verbose=args.verbose,
                   log_format={"plain": kopf.LogFormat.PLAIN, "full": kopf.LogFormat.FULL,
                               "json": kopf.LogFormat.JSON}[args.log_format])
    settings = settings_from_args(args)
    try:
        credentials = load_credentials()
    except Exception as exc:  # kubernetes' loaders raise several unrelated types
        print(f"cistern-operator: no Kubernetes credentials: {exc}", file=sys.stderr)
        return 2
    namespaces: list[str] | None = list(args.namespace) if args.namespace else None
    registry = build_registry(settings, credentials, namespaces)
    logger.info("Starting the Cistern operator for %s",
                ", ".join(namespaces) if namespaces else "all namespaces")
    try:
        asyncio.run(kopf.operator(
            registry=registry, standalone=args.standalone,
            clusterwide=namespaces is None, namespaces=namespaces or (),
            liveness_endpoint=args.liveness))
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

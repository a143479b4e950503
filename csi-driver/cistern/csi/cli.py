"""``cistern-csi``: the Cistern CSI driver (Identity + Node and/or Controller over gRPC)."""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import signal
import sys
import threading
from types import FrameType

from cistern.csi.health import HealthServer, parse_address
from cistern.csi.settings import DEFAULT_ACCESS_DIR, MODES, DriverSettings, socket_path
from cistern.writecache import DEFAULT_MOUNT_ROOT

__all__ = ["main", "parse_settings"]

log = logging.getLogger("cistern.csi")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cistern-csi",
        description="Cistern CSI driver (csi.cistern.dev): serves CSI v1 on a unix socket.")
    parser.add_argument("--endpoint", required=True, metavar="unix:///PATH",
                        help="unix socket to listen on, e.g. unix:///csi/csi.sock")
    parser.add_argument("--node-id", default="", metavar="NAME",
                        help="this node's name (required unless --mode controller)")
    parser.add_argument("--mode", choices=MODES, default="all",
                        help="services to run (default: all)")
    parser.add_argument("--mount-root", default=DEFAULT_MOUNT_ROOT, metavar="DIR",
                        help=f"where cache daemons mount WriteCache NAME at DIR/NAME "
                             f"(default {DEFAULT_MOUNT_ROOT})")
    parser.add_argument("--access-dir", default=DEFAULT_ACCESS_DIR, metavar="DIR",
                        help="the caches' access policies, <cache-key>.json (the ConfigMap "
                             f"cistern-access; default {DEFAULT_ACCESS_DIR})")
    parser.add_argument("--state-file", default="", metavar="FILE",
                        help="controller: remember provisioned volumes here across restarts "
                             "(default: memory only)")
    parser.add_argument("--health-timeout", type=float, default=5.0, metavar="SECONDS",
                        help="how long a cache mount may take to answer (default 5)")
    parser.add_argument("--health-address", default="", metavar="HOST:PORT",
                        help="serve GET /healthz (liveness: the gRPC server answers) and "
                             "/readyz (readiness: the Probe verdict) on this address, "
                             "e.g. :9808 (default: off)")
    parser.add_argument("--log-level", default="INFO",
                        choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    return parser


def parse_settings(argv: list[str] | None = None
                   ) -> tuple[DriverSettings, str, tuple[str, int] | None]:
    """The driver settings, the log level and the health address (None: no endpoint)."""
    parser = _parser()
    args = parser.parse_args(argv)
    health = None
    if args.health_address:
        try:
            health = parse_address(args.health_address)
        except ValueError as exc:
            parser.error(str(exc))
    try:
        version = importlib.metadata.version("cistern")
    except importlib.metadata.PackageNotFoundError:
        version = "0.0.0+unknown"
    try:
        settings = DriverSettings(endpoint=args.endpoint, node_id=args.node_id, mode=args.mode,
                                  mount_root=args.mount_root, access_dir=args.access_dir,
                                  state_file=args.state_file,
                                  health_timeout=args.health_timeout, version=version)
    except ValueError as exc:
        parser.error(str(exc))
    return settings, args.log_level, health


def main(argv: list[str] | None = None) -> int:
    settings, level, health_address = parse_settings(argv)
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
                        datefmt="%Y-%m-%dT%H:%M:%S")
    from cistern.csi.server import build_server

    try:
        server = build_server(settings)
    except (OSError, RuntimeError) as exc:
        log.error("cannot listen on %s: %s", settings.endpoint, exc)
        return 1
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("signal %s: stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.start()
    health = None
    if health_address is not None:
        try:
            health = HealthServer(health_address, socket_path(settings.endpoint),
                                  settings.health_timeout)
        except OSError as exc:
            log.error("cannot serve health endpoints on %s:%d: %s", *health_address, exc)
            server.stop(grace=0).wait()
            return 1
        health.start()
    print(f"cistern-csi: serving {settings.mode} on {settings.endpoint}", file=sys.stderr,
          flush=True)
    stop.wait()
    if health is not None:
        health.stop()
    server.stop(grace=5).wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

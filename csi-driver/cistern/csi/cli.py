"""``cistern-csi``: the Cistern CSI driver (Identity + Node and/or Controller over gRPC)."""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import signal
import sys
import threading
from types import FrameType

from cistern.csi.settings import MODES, DriverSettings
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
    parser.add_argument("--health-timeout", type=float, default=5.0, metavar="SECONDS",
                        help="how long a cache mount may take to answer (default 5)")
    parser.add_argument("--log-level", default="INFO",
                        choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    return parser


def parse_settings(argv: list[str] | None = None) -> tuple[DriverSettings, str]:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        version = importlib.metadata.version("cistern")
    except importlib.metadata.PackageNotFoundError:
        version = "0.0.0+unknown"
    try:
        settings = DriverSettings(endpoint=args.endpoint, node_id=args.node_id, mode=args.mode,
                                  mount_root=args.mount_root,
                                  health_timeout=args.health_timeout, version=version)
    except ValueError as exc:
        parser.error(str(exc))
    return settings, args.log_level


def main(argv: list[str] | None = None) -> int:
    settings, level = parse_settings(argv)
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
    print(f"cistern-csi: serving {settings.mode} on {settings.endpoint}", file=sys.stderr,
          flush=True)
    stop.wait()
    server.stop(grace=5).wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

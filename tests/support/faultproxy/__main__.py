"""``python -m support.faultproxy``: the proxy as a process, on 127.0.0.1."""

from __future__ import annotations

import argparse
import contextlib
import logging

from ..s3server import free_port
from .kinds import KINDS
from .proxy import FaultProxy


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m support.faultproxy",
        description="S3 latency/fault-injecting proxy on 127.0.0.1 (tests and benchmarks)")
    parser.add_argument("--upstream", required=True, help="S3 endpoint URL (http://...)")
    parser.add_argument("--port", type=int, default=0, help="port (0: pick a free one)")
    parser.add_argument("--latency-ms", type=float, default=0.0,
                        help="milliseconds added to every S3 request")
    parser.add_argument("--error-rate", type=float, default=0.0,
                        help="fraction of requests answered 503 SlowDown")
    parser.add_argument("--internal-error-rate", type=float, default=0.0,
                        help="fraction of requests answered 500 InternalError")
    parser.add_argument("--error-kinds", default="",
                        help=f"comma-separated kinds eligible for errors ({','.join(KINDS)})")
    parser.add_argument("--seed", type=int, default=None, help="random seed for failures")
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    kinds = [k.strip().upper() for k in args.error_kinds.split(",") if k.strip()]
    port = args.port or free_port()
    proxy = FaultProxy(args.upstream, latency=args.latency_ms / 1000.0,
                       error_rate=args.error_rate, internal_error_rate=args.internal_error_rate,
                       error_kinds=kinds or None, seed=args.seed, port=port)
    print(f"fault proxy on http://127.0.0.1:{port} -> {args.upstream}", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        proxy.serve_forever()


if __name__ == "__main__":
    main()

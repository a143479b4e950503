"""``cistern-node``: run a cache node, or ask a running one for status, flush or drain."""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cistern.config import DEFAULT_CONTROL, ConfigError, NodeConfig, load_node_config
from cistern.nodestatus import NodeStatus, NodeStatusError

__all__ = ["main"]

_EPILOG = """examples:
  cistern-node run                                  # ./mnt over a local object store in ./.cistern
  cistern-node run --mount /mnt/ckpt --cache-dir /nvme/cistern \\
      --store s3://my-bucket/checkpoints --region us-east-1
  cistern-node status
  cistern-node flush --timeout 600
  cistern-node drain --wait 3600
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cistern-node",
        description="Cistern cache node: a write-back FUSE cache on local disk over S3.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="mount the cache and serve it (foreground)",
                         description="Mount the write-back cache and serve it in the "
                         "foreground. Logs go to stderr. SIGINT unmounts at once (dirty data "
                         "stays journaled and uploads on the next start); SIGTERM drains "
                         "first.")
    run.add_argument("--mount", help="mount point (default ./mnt; ./mnt, and a config "
                     "file's mount point whose parent exists, are created if missing)")
    run.add_argument("--cache-dir", help="local cache directory on fast disk "
                     "(default ./.cistern/cache)")
    run.add_argument("--store", help="s3://bucket[/prefix] or file:///path "
                     "(default file://$PWD/.cistern/objects)")
    run.add_argument("--endpoint-url", help="S3 endpoint URL (MinIO, a proxy, ...)")
    run.add_argument("--region", help="S3 region")
    run.add_argument("--path-style", action="store_true", default=None,
                     help="use path-style S3 addressing")
    run.add_argument("--upload-delay", type=float, metavar="SECONDS",
                     help="seconds a closed file waits before upload (default 1)")
    run.add_argument("--control", metavar="HOST:PORT",
                     help=f"control API address (default {DEFAULT_CONTROL})")
    run.add_argument("--fuse-frontend", choices=("auto", "passthrough", "splice", "pyfuse3"),
                     help="FUSE implementation (default auto: kernel passthrough when "
                     "available, else splice)")
    run.add_argument("--fuse-holder", metavar="SOCKET",
                     help="unix socket of a FUSE holder (cistern-node holder): the mount "
                     "then survives a crash, restart or upgrade of this daemon")
    run.add_argument("--peer-node-name", metavar="NAME",  # issue 17: one ConfigMap, many pods
                     help="this node's name among the peers (peers.nodeName; the operator "
                     "passes the Kubernetes node name)")
    run.add_argument("--config", metavar="FILE", help="YAML node config (flags override it); "
                     "see docs/configuration.md")
    run.add_argument("--log-level", default="info",
                     choices=("debug", "info", "warning", "error"))
    run.add_argument("--log-format", default="text", choices=("text", "json"))

    holder = sub.add_parser("holder", help="keep FUSE connections open across daemon "
                            "restarts (foreground)",
                            description="Hold the /dev/fuse connections that cistern-node run "
                            "--fuse-holder SOCKET hands over, so that a new daemon can take "
                            "over a mount after a crash, restart or upgrade of the old one. "
                            "Stopping the holder ends the mounts no daemon serves.")
    holder.add_argument("--socket", required=True, help="unix socket to listen on")
    holder.add_argument("--log-level", default="info",
                        choices=("debug", "info", "warning", "error"))
    holder.add_argument("--log-format", default="text", choices=("text", "json"))

    for name, text in (("status", "show the state of a running node"),
                       ("flush", "upload everything dirty now and wait"),
                       ("drain", "evacuate all dirty data, then report drained"),
                       ("resume", "cancel a drain and accept writes again")):
        cmd = sub.add_parser(name, help=text, description=text)
        cmd.add_argument("--control", default=DEFAULT_CONTROL, metavar="HOST:PORT",
                         help=f"control API address (default {DEFAULT_CONTROL})")
        cmd.add_argument("--token-file", help="bearer token for a protected control API")
        cmd.add_argument("--json", action="store_true", help="print raw JSON")
        if name in ("flush", "drain"):
            cmd.add_argument("--timeout", type=float, default=3600.0, metavar="SECONDS",
                             help="give up waiting after this long (default 3600)")
        if name == "drain":
            cmd.add_argument("--no-wait", action="store_true",
                             help="start the drain and return at once")
    return parser


def _build_config(args: argparse.Namespace) -> NodeConfig:
    data: dict[str, Any] = load_node_config(args.config) if args.config else {}
    data.setdefault("store", {})
    data.setdefault("cache", {})
    data.setdefault("flush", {})
    cwd = Path.cwd()
    if args.store:
        data["store"] = {k: v for k, v in data["store"].items()
                         if k not in ("url",)} | {"url": args.store}
    if "url" not in data["store"]:
        data["store"]["url"] = f"file://{cwd / '.cistern' / 'objects'}"
    for flag, key in ((args.endpoint_url, "endpointUrl"), (args.region, "region"),
                      (args.path_style, "pathStyle")):
        if flag is not None:
            data["store"][key] = flag
    if args.endpoint_url and "pathStyle" not in data["store"]:
        data["store"]["pathStyle"] = True
    if args.mount:
        data["mount"] = args.mount
    elif "mount" not in data:
        data["mount"] = str(cwd / "mnt")
        os.makedirs(data["mount"], exist_ok=True)
    if args.cache_dir:
        data["cache"]["dir"] = args.cache_dir
    elif "dir" not in data["cache"]:
        data["cache"]["dir"] = str(cwd / ".cistern" / "cache")
    if args.upload_delay is not None:
        data["flush"]["uploadDelay"] = args.upload_delay
    if args.control:
        data["control"] = args.control
    if args.fuse_frontend:
        data["fuseFrontend"] = args.fuse_frontend
    if args.fuse_holder:
        data["fuseHolder"] = args.fuse_holder
    if args.peer_node_name:
        data["peers"] = {**(data.get("peers") or {}), "nodeName": args.peer_node_name}
    config = NodeConfig.from_dict(data)
    if args.config and not args.mount:
        _create_configured_mount(config.mount)
    if config.store.scheme == "file":
        os.makedirs(config.store.local_path, exist_ok=True) if not args.store else None
    return config


def _create_configured_mount(path: str) -> None:
    """Create a config file's mount point (one level) if it is missing.

    The operator's config names ``<mountRoot>/<writecache>`` while the DaemonSet's hostPath
    volume is the mount *root*, so on a fresh node only the root exists. Only the last
    component is created: a missing root is still the error ``prepare()`` reports, so a
    mistyped path never grows a tree of directories. A dead FUSE mount left at ``path`` by a
    killed daemon exists (EEXIST, or ENOTCONN on the stat); ``prepare()`` detaches it.
    """
    try:
        os.mkdir(path, 0o755)
    except OSError as exc:
        if exc.errno not in (errno.EEXIST, errno.ENOENT, errno.ENOTCONN):
            raise


def _run(args: argparse.Namespace) -> int:
    from cistern.cachenode.daemon import NodeDaemon, StartupError
    from cistern.logs import setup_logging

    setup_logging(args.log_level, args.log_format)
    try:
        config = _build_config(args)
    except (ConfigError, OSError) as exc:
        print(f"cistern-node: error: {exc}", file=sys.stderr)
        return 2
    daemon = NodeDaemon(config)
    try:
        daemon.prepare()
    except StartupError as exc:
        print(f"cistern-node: error: {exc}", file=sys.stderr)
        return 1
    return daemon.run()


def _holder(args: argparse.Namespace) -> int:
    import signal

    from cistern.cachenode.holder import HolderServer
    from cistern.logs import setup_logging

    setup_logging(args.log_level, args.log_format)
    try:
        server = HolderServer(args.socket)
    except OSError as exc:
        print(f"cistern-node: error: holder socket {args.socket}: {exc.strerror or exc}",
              file=sys.stderr)
        return 1
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: server.stop())
    server.serve_forever()
    return 0


def _call(args: argparse.Namespace, method: str, path: str, timeout: float) -> dict[str, Any]:
    url = f"http://{args.control}{path}"
    request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    if getattr(args, "token_file", None):
        token = Path(args.token_file).read_text().strip()
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return dict(json.load(response))
    except urllib.error.HTTPError as exc:
        body = exc.read()
        try:
            return dict(json.loads(body)) | {"http_status": exc.code}
        except ValueError:
            raise SystemExit(f"cistern-node: error: {url}: HTTP {exc.code}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise SystemExit(f"cistern-node: error: no cache node answers at {args.control} "
                         f"({reason})") from None


def _status(args: argparse.Namespace, method: str, path: str, timeout: float) -> NodeStatus:
    """A control call whose answer is the node's status (GET /status, POST /flush|drain|resume)."""
    answer = _call(args, method, path, timeout)
    try:
        return NodeStatus.from_json(answer)
    except NodeStatusError as exc:
        code = answer.get("http_status")
        problem = f"HTTP {code}: {answer.get('error', answer)}" if code else str(exc)
        raise SystemExit(f"cistern-node: error: {args.control}{path}: {problem}") from None


def _size(n: float | int | None) -> str:
    value = float(n or 0)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(n)


def _summary(status: NodeStatus) -> str:
    lines = [
        f"state:          {status.state}",
        f"front end:      {status.frontend}",
        f"mount:          {status.mount} -> {status.store}",
        f"dirty:          {_size(status.dirty_bytes)} in "
        f"{status.dirty_files} files ({status.uploading_files} uploading)",
        f"clean (cached): {_size(status.clean_bytes)}",
        f"uploaded:       {_size(status.uploaded_bytes_total)} in "
        f"{status.uploaded_objects_total} objects",
        f"pending:        {status.pending_moves} renames, {status.pending_deletes} deletes",
        f"errors:         {status.errors}",
    ]
    drain = status.drain
    if drain:
        eta = drain.eta_seconds
        lines.append(f"drain:          {_size(drain.bytes_left)} left, ETA "
                     f"{'-' if eta is None else f'{eta:.0f}s'}")
    for error in status.recent_errors[-3:]:
        lines.append(f"  last error: {error.summary()}")
    return "\n".join(lines)


def _show(status: NodeStatus, as_json: bool) -> str:
    return json.dumps(status.to_json(), indent=1) if as_json else _summary(status)


def _progress(args: argparse.Namespace, until_done: Callable[[NodeStatus], bool],
              deadline: float) -> NodeStatus:
    """Poll /status and print a progress line until ``until_done(status)`` or the deadline."""
    tty = sys.stderr.isatty()
    start_bytes: float | None = None
    status = _status(args, "GET", "/status", 10)
    while not until_done(status) and time.monotonic() < deadline:
        left = float(status.dirty_bytes)
        start_bytes = left if start_bytes is None else max(start_bytes, left)
        done = start_bytes - left
        pct = 100.0 * done / start_bytes if start_bytes else 100.0
        line = (f"{status.state}: {_size(left)} left in {status.dirty_files} "
                f"files, {pct:5.1f}% done")
        if tty:
            print(f"\r{line}\033[K", end="", file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)
        time.sleep(0.5 if tty else 5.0)
        status = _status(args, "GET", "/status", 10)
    if tty:
        print("", file=sys.stderr)
    return status


def _client(args: argparse.Namespace) -> int:
    if args.command == "status":
        status = _status(args, "GET", "/status", 10)
    elif args.command == "resume":
        status = _status(args, "POST", "/resume", 10)
    elif args.command == "flush":
        import threading

        result: list[NodeStatus] = []

        def flush() -> None:
            result.append(_status(args, "POST", f"/flush?timeout={args.timeout}",
                                  args.timeout + 30))

        worker = threading.Thread(target=flush, daemon=True)
        worker.start()
        deadline = time.monotonic() + args.timeout + 30
        if not args.json:
            _progress(args, lambda s: not worker.is_alive(), deadline)
        worker.join(max(0.0, deadline - time.monotonic()))
        if not result or not result[0].flushed:
            if result:
                print(_show(result[0], args.json))
            print("cistern-node: flush did not finish in time", file=sys.stderr)
            return 1
        status = result[0]
    else:
        status = _status(args, "POST", "/drain", 30)
        if not args.no_wait:
            deadline = time.monotonic() + args.timeout
            status = _progress(args, lambda s: s.state == "drained", deadline) \
                if not args.json else status
            while status.state != "drained" and time.monotonic() < deadline:
                time.sleep(0.5)
                status = _status(args, "GET", "/status", 10)
            if status.state != "drained":
                print(_show(status, args.json))
                print("cistern-node: drain did not finish in time", file=sys.stderr)
                return 1
    print(_show(status, args.json))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "run":
        return _run(args)
    if args.command == "holder":
        return _holder(args)
    return _client(args)


if __name__ == "__main__":
    sys.exit(main())

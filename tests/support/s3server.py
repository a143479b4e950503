"""A real S3 HTTP server for tests and benchmarks: moto in server mode on 127.0.0.1.

Run it as a process (``python -m support.s3server --port 0`` with tests/ on the path) or use
``MotoServer`` which starts that process on a free port and waits for it.

moto 5.2 computes an object's ETag lazily by reading a buffer shared with concurrent
requests, without a lock; a LIST racing a PUT's own response can cache a wrong MD5.
The server entry point puts a lock around the ETag getter before serving.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from .wait import WaitTimeout, wait_until

__all__ = [
    "ChildServer", "MotoServer", "free_port", "list_keys", "read_object", "s3_client", "stop_child",
    "support_module_command", "wait_for_port",
]

TEST_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def support_module_command(module: str) -> tuple[list[str], dict[str, str]]:
    """The argv and environment that run ``<this package>.<module>`` with ``python -m``.

    This package is imported as ``support`` by pytest (``pythonpath = ["tests"]``) and as
    ``tests.support`` by bench/ (run from the repository root); the child gets the same
    package name and a PYTHONPATH that reaches it, whatever the parent's working directory.
    """
    package = __package__ or "support"
    root = Path(__file__).resolve().parents[package.count(".") + 1]
    path = os.environ.get("PYTHONPATH")
    env = dict(os.environ, PYTHONPATH=f"{root}{os.pathsep}{path}" if path else str(root))
    return [sys.executable, "-m", f"{package}.{module}"], env


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout: float = 30.0, host: str = "127.0.0.1") -> None:
    """Until something accepts connections on ``host:port``; ``WaitTimeout`` after
    ``timeout`` seconds."""

    def listening() -> bool:
        with socket.create_connection((host, port), timeout=1.0):
            return True

    wait_until(listening, timeout, f"something listening on {host}:{port}", ignore=(OSError,))


def s3_client(endpoint_url: str) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        aws_access_key_id=TEST_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=TEST_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        region_name=TEST_CREDENTIALS["AWS_DEFAULT_REGION"],
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}),
    )


def stop_child(proc: subprocess.Popen[bytes] | None, timeout: float = 10.0) -> None:
    """Terminate a helper server process, killing it if it does not exit in time."""
    if proc is None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def read_object(s3: Any, bucket: str, key: str) -> bytes:
    return bytes(s3.get_object(Bucket=bucket, Key=key)["Body"].read())


def list_keys(s3: Any, bucket: str, prefix: str = "") -> dict[str, int]:
    """Every key under ``prefix`` with its size."""
    out: dict[str, int] = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            out[item["Key"]] = item["Size"]
    return out


class ChildServer:
    """A module of this package run as a child process that serves HTTP on 127.0.0.1:``port``;
    ``start`` returns once the port accepts connections. Subclasses name the module and its
    arguments."""

    module = ""
    """The module of this package to run (``python -m support.<module>``)."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._proc: subprocess.Popen[bytes] | None = None

    def arguments(self) -> list[str]:
        return ["--port", str(self.port)]

    def environment(self, env: dict[str, str]) -> dict[str, str]:
        return env

    def start(self) -> Self:
        command, env = support_module_command(self.module)
        self._proc = subprocess.Popen(
            [*command, *self.arguments()], env=self.environment(env),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            wait_for_port(self.port)
        except WaitTimeout:
            self.stop()
            raise
        return self

    @property
    def pid(self) -> int:
        assert self._proc is not None, "not started"
        return self._proc.pid

    def stop(self) -> None:
        stop_child(self._proc)
        self._proc = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


class MotoServer(ChildServer):
    """A moto S3 server in a child process on 127.0.0.1."""

    module = "s3server"

    def environment(self, env: dict[str, str]) -> dict[str, str]:
        return env | TEST_CREDENTIALS

    def client(self) -> Any:
        return s3_client(self.endpoint)


def _lock_etag_getter() -> None:
    from moto.s3 import models

    original = models.FakeKey.etag
    lock = threading.Lock()

    def etag(self: Any) -> str:
        with lock:
            return original.fget(self)  # type: ignore[attr-defined,no-any-return,misc]

    models.FakeKey.etag = property(etag)  # type: ignore[assignment,method-assign]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="moto S3 server on 127.0.0.1 for tests")
    parser.add_argument("--port", type=int, default=0, help="port (0: pick a free one)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (0.0.0.0 inside a pod, e.g. the kind e2e suite)")
    args = parser.parse_args(argv)
    os.environ.update({k: os.environ.get(k, v) for k, v in TEST_CREDENTIALS.items()})
    _lock_etag_getter()
    from moto.moto_server.threaded_moto_server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address=args.host, port=args.port or free_port(),
                                verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    print(f"moto S3 server on http://{host}:{port}", flush=True)
    try:
        signal.pause()  # until SIGINT (KeyboardInterrupt) stops the server
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()

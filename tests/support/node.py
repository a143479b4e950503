"""Start and drive a real ``cistern-node`` process for tests and benchmarks."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

from cistern.nodestatus import NodeStatus

from .s3server import TEST_CREDENTIALS, free_port
from .wait import WaitTimeout, wait_until

__all__ = ["NodeProcess", "is_mounted", "unmount"]


def is_mounted(path: str | Path) -> bool:
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == real for line in f if len(line.split()) > 4)


def unmount(path: str | Path) -> None:
    """Detach a FUSE mount left behind by a killed daemon."""
    if is_mounted(path):
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


class _PortTaken(RuntimeError):
    """Another process took the control port between ``free_port`` and the daemon's bind."""


class NodeProcess:
    """``cistern-node run`` as a child process with its own cache dir, mount and port.

    ``config`` is merged into the YAML node config written for the process (camelCase keys,
    see cistern.config). ``store`` is ``s3://bucket[/prefix]`` or ``file:///path``.
    """

    def __init__(self, workdir: Path, store: str, *, endpoint_url: str | None = None,
                 frontend: str = "pyfuse3", upload_delay: float = 0.2,
                 config: dict[str, Any] | None = None, extra_args: list[str] | None = None,
                 cache_dir: Path | None = None, mount: Path | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.workdir = workdir
        self.mount = mount or workdir / "mnt"
        self.cache_dir = cache_dir or workdir / "cache"
        self.store = store
        self.endpoint_url = endpoint_url
        self.frontend = frontend
        self.upload_delay = upload_delay
        self.config = config or {}
        self.extra_args = extra_args or []
        self.env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None
        self._pick_port()

    def _pick_port(self) -> None:
        self.port = free_port()
        self.control = f"127.0.0.1:{self.port}"
        self.log_path = self.workdir / f"node-{self.port}.log"

    def command(self) -> list[str]:
        config_path = self.workdir / f"node-{self.port}.yaml"
        data: dict[str, Any] = {"store": {"url": self.store}}
        if self.endpoint_url:
            data["store"].update(endpointUrl=self.endpoint_url, pathStyle=True)
        for section, values in self.config.items():
            if isinstance(values, dict):
                data.setdefault(section, {}).update(values)
            else:
                data[section] = values
        config_path.write_text(yaml.safe_dump(data))
        return [sys.executable, "-m", "cistern.cachenode.cli", "run", "--config",
                str(config_path), "--mount", str(self.mount), "--cache-dir", str(self.cache_dir),
                "--control", self.control, "--upload-delay", str(self.upload_delay),
                "--fuse-frontend", self.frontend, "--log-level", "debug", *self.extra_args]

    def start(self, timeout: float = 30.0) -> NodeProcess:
        """Start the daemon and wait until it serves. ``free_port`` cannot reserve the port:
        on a busy machine another process may take it first, and then a new one is picked."""
        for _ in range(2):
            try:
                return self._start(timeout)
            except _PortTaken:
                self._close_log()
                self._pick_port()
        return self._start(timeout)

    def _start(self, timeout: float) -> NodeProcess:
        # A dead mount left by a killed daemon fails mkdir; the daemon detaches it itself.
        with contextlib.suppress(OSError):
            self.mount.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, **TEST_CREDENTIALS, **self.env)
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(self.command(), env=env, stdout=self._log_file,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        proc = self.proc

        def running() -> bool:
            if proc.poll() is not None:
                log = self.log()
                if f"control address {self.control}: Address already in use" in log:
                    raise _PortTaken(log)
                raise RuntimeError(f"cistern-node exited with {proc.returncode}:\n{log}")
            return is_mounted(self.mount) and self.status().state == "running"

        try:
            wait_until(running, timeout=timeout, what="cistern-node to mount and run",
                       ignore=(OSError, urllib.error.URLError, ValueError))
        except WaitTimeout:
            self.kill()
            raise TimeoutError(f"cistern-node did not come up in {timeout}s:\n"
                               f"{self.log()}") from None
        return self

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-20000:]
        except OSError:
            return ""

    def _request(self, method: str, path: str, timeout: float = 30.0) -> dict[str, Any]:
        request = urllib.request.Request(f"http://{self.control}{path}", method=method,
                                         data=b"" if method == "POST" else None)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return dict(json.load(response))
        except urllib.error.HTTPError as exc:
            return dict(json.loads(exc.read())) | {"http_status": exc.code}

    def status(self) -> NodeStatus:
        return NodeStatus.from_json(self._request("GET", "/status", timeout=5))

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://{self.control}/metrics", timeout=5) as response:
            return str(response.read().decode())

    def metric(self, name: str, labels: str = "") -> float:
        """Sum of the samples of ``name`` whose label set contains ``labels``."""
        total = 0.0
        for line in self.metrics().splitlines():
            if line.startswith("#"):
                continue
            sample, _, value = line.rpartition(" ")
            base = sample.split("{", 1)[0]
            if base == name and labels in sample:
                total += float(value)
        return total

    def flush(self, timeout: float = 120.0) -> NodeStatus:
        result = self._request("POST", f"/flush?timeout={timeout}", timeout=timeout + 10)
        status = NodeStatus.from_json(result)
        if not status.flushed:
            raise AssertionError(f"flush did not finish: {result}\n{self.log()}")
        return status

    def drain(self, wait: float = 0.0) -> NodeStatus:
        return NodeStatus.from_json(self._request("POST", f"/drain?wait={wait}",
                                                  timeout=wait + 10))

    def kill(self) -> None:
        """``kill -9``: no chance to persist anything beyond what is already journaled."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        unmount(self.mount)
        self._close_log()

    def stop(self, sig: int = signal.SIGINT, timeout: float = 30.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        unmount(self.mount)
        self._close_log()
        return int(self.proc.returncode if self.proc.returncode is not None else -9)

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> NodeProcess:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

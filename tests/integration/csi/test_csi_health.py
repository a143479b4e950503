"""cistern-csi --health-address: liveness stays up on a node without a cache; readiness is the
honest Probe verdict (so the chart's liveness probe never crash-loops the plugin there)."""

from __future__ import annotations

import signal
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from cistern.csi.proto import csi_pb2, csi_pb2_grpc
from support.s3server import free_port
from support.wait import wait_until

from .conftest import CSI_COMMAND

pytestmark = pytest.mark.timeout(120)


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.fixture
def plugin(short_tmp: Path, mount_root: Path) -> Iterator[tuple[int, subprocess.Popen[str]]]:
    """cistern-csi --mode node with health endpoints, on the module's (empty) mount root."""
    port = free_port()
    socket = short_tmp / "health.sock"
    process = subprocess.Popen(
        [*CSI_COMMAND, "--endpoint", f"unix://{socket}", "--node-id", "n", "--mode", "node",
         "--mount-root", str(mount_root), "--health-timeout", "2",
         "--health-address", f"127.0.0.1:{port}"],
        stderr=subprocess.PIPE, text=True)
    try:
        with grpc.insecure_channel(f"unix://{socket}") as channel:
            grpc.channel_ready_future(channel).result(timeout=20)
            probe = csi_pb2_grpc.IdentityStub(channel).Probe(csi_pb2.ProbeRequest())
            assert probe.ready.value is False  # no cache here: Probe stays honest
        def healthz_answers() -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"the CSI driver exited with {process.returncode}")
            get(port, "/healthz")
            return True

        wait_until(healthz_answers, timeout=20, what="/healthz", ignore=(OSError,))
        yield port, process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=20)
        print(stderr)


def test_alive_but_not_ready_without_a_cache(
        plugin: tuple[int, subprocess.Popen[str]], make_cache_dir: Any) -> None:
    port, process = plugin
    code, text = get(port, "/healthz")
    assert (code, text.startswith("ok: csi.cistern.dev")) == (200, True), text
    code, text = get(port, "/readyz")
    assert code == 503 and "not ready" in text
    # A cache whose daemon is down: still alive, still not ready.
    make_cache_dir("down")
    assert get(port, "/healthz")[0] == 200
    assert get(port, "/readyz")[0] == 503
    assert get(port, "/other")[0] == 404
    # Liveness answers from the serving process; stopping it stops the endpoint too.
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=20) == 0


def test_liveness_fails_when_the_grpc_server_is_stuck(
        plugin: tuple[int, subprocess.Popen[str]]) -> None:
    port, process = plugin
    assert get(port, "/healthz")[0] == 200
    process.send_signal(signal.SIGSTOP)  # the whole process hangs: no answer at all
    try:
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=3)
    finally:
        process.send_signal(signal.SIGCONT)
    assert get(port, "/healthz")[0] == 200


def test_ready_with_a_healthy_cache(plugin: tuple[int, subprocess.Popen[str]],
                                    start_cache: Any) -> None:
    port, _ = plugin
    start_cache("ready")
    code, text = get(port, "/readyz")
    assert (code, text.strip()) == (200, "ready")
    assert get(port, "/healthz")[0] == 200


def test_bad_health_address_is_a_usage_error(short_tmp: Path) -> None:
    result = subprocess.run([*CSI_COMMAND, "--endpoint", f"unix://{short_tmp}/x.sock",
                             "--node-id", "n", "--health-address", "nowhere"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "HOST:PORT" in result.stderr

"""The cistern-csi command line: argument errors, socket handling, clean shutdown."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import grpc

from cistern.csi.proto import csi_pb2, csi_pb2_grpc

from .conftest import CSI_COMMAND


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CSI_COMMAND, *args], capture_output=True, text=True, timeout=60)


def test_bad_arguments_exit_with_a_usage_error(short_tmp: Path) -> None:
    result = run("--endpoint", "tcp://127.0.0.1:1234", "--node-id", "n")
    assert result.returncode == 2 and "unix:///" in result.stderr
    result = run("--endpoint", f"unix://{short_tmp}/a.sock", "--mode", "node")
    assert result.returncode == 2 and "--node-id" in result.stderr
    result = run("--endpoint", f"unix://{short_tmp}/a.sock", "--node-id", "n", "--mode", "x")
    assert result.returncode == 2


def test_refuses_to_replace_a_file_that_is_not_a_socket(short_tmp: Path) -> None:
    path = short_tmp / "not-a-socket"
    path.write_text("keep me")
    result = run("--endpoint", f"unix://{path}", "--node-id", "n")
    assert result.returncode == 1 and "not a socket" in result.stderr
    assert path.read_text() == "keep me"


def test_replaces_a_stale_socket_and_stops_cleanly_on_sigterm(short_tmp: Path) -> None:
    socket = short_tmp / "restart.sock"

    def start() -> subprocess.Popen[str]:
        process = subprocess.Popen([*CSI_COMMAND, "--endpoint", f"unix://{socket}",
                                    "--node-id", "n", "--mount-root", str(short_tmp)],
                                   stderr=subprocess.PIPE, text=True)
        with grpc.insecure_channel(f"unix://{socket}") as channel:
            grpc.channel_ready_future(channel).result(timeout=20)
            info = csi_pb2_grpc.IdentityStub(channel).GetPluginInfo(
                csi_pb2.GetPluginInfoRequest())
            assert info.name == "csi.cistern.dev"
        return process

    crashed = start()
    crashed.kill()  # a crash leaves the socket file behind
    crashed.communicate(timeout=20)
    assert socket.exists()
    process = start()  # the next run replaces it
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=20)  # a driver that ignored SIGTERM times out
    assert process.returncode == 0, stderr
    assert "SIGTERM" in stderr

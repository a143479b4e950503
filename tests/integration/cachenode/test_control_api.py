"""The node control API treats every client as hostile (issue 13, docs/security.md).

A real ControlServer on a real socket; the node behind it records what reached it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cistern.cachenode.control import MAX_BODY, MAX_HEAD, ControlServer
from cistern.config import ConfigError, NodeConfig
from support.s3server import free_port

TOKEN = "s3cr3t-token"
SECRET_URL = "http://AKIAEXAMPLE:wJalrXUtnFEMI@minio.example:9000/bucket"


class RecordingNode:
    """Answers like a node and records each mutating call that reached it."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, float]] = []

    def status(self) -> dict[str, Any]:
        return {"state": "running", "recent_errors": [f"Could not connect to {SECRET_URL}"],
                "store": SECRET_URL}

    def flush(self, timeout: float) -> bool:
        self.calls.append(("flush", timeout))
        return True

    def drain(self, wait: float) -> dict[str, Any]:
        self.calls.append(("drain", wait))
        return self.status()

    def resume(self) -> dict[str, Any]:
        self.calls.append(("resume", 0.0))
        return self.status()

    def metrics(self) -> bytes:
        return b"cistern_up 1\n"


@pytest.fixture
def node() -> RecordingNode:
    return RecordingNode()


@pytest.fixture
def server(node: RecordingNode) -> Iterator[ControlServer]:
    control = ControlServer(node, "127.0.0.1", 0, TOKEN, idle_timeout=2.0)
    control.start()
    yield control
    control.stop()


def _connect(server: ControlServer) -> socket.socket:
    sock = socket.create_connection((str(server.address[0]), int(server.address[1])))
    sock.settimeout(20)  # a deadline: a server that never answers fails the test
    return sock


def _response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        piece = sock.recv(65536)
        if not piece:
            break
        data += piece
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        piece = sock.recv(65536)
        if not piece:
            break
        body += piece
    return int(lines[0].split()[1]), headers, body


def _request(server: ControlServer, head: str, body: bytes = b"") -> tuple[int, bytes]:
    with _connect(server) as sock:
        sock.sendall(head.encode("latin-1") + body)
        code, _, payload = _response(sock)
        return code, payload


def test_unauthenticated_negative_length_body_is_refused_unread(
        server: ControlServer, node: RecordingNode) -> None:
    """The issue's repro: Content-Length -1 and 256 MiB streamed; 401 before the body."""
    total = 256 * 2**20
    sent = 0
    stopped: list[BaseException] = []
    sock = _connect(server)

    def stream() -> None:
        nonlocal sent
        piece = b"x" * 2**20
        try:
            while sent < total:
                sock.sendall(piece)
                sent += len(piece)
            sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            stopped.append(exc)

    sock.sendall(b"POST /drain HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n")
    sender = threading.Thread(target=stream, daemon=True)
    sender.start()
    try:
        code, headers, body = _response(sock)
        sender.join(timeout=60)
    finally:
        sock.close()
    assert code == 401, body
    assert headers.get("connection") == "close"
    assert not node.calls
    # The server hung up instead of reading the body: the sender was cut off long before
    # it could push 256 MiB (the unfixed server read until EOF and only then answered).
    assert stopped and sent < total // 4, (sent, stopped)


@pytest.mark.parametrize("length", ["-1", "99999999999999999999", "12abc", str(MAX_BODY + 1)])
def test_authenticated_bad_or_huge_lengths_are_refused(
        server: ControlServer, node: RecordingNode, length: str) -> None:
    code, payload = _request(server, f"POST /drain HTTP/1.1\r\nHost: x\r\nAuthorization: "
                             f"Bearer {TOKEN}\r\nContent-Length: {length}\r\n\r\n")
    assert code in (400, 413), payload
    assert not node.calls


def test_chunked_body_is_refused(server: ControlServer, node: RecordingNode) -> None:
    code, _ = _request(server, f"POST /flush HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                       f"{TOKEN}\r\nTransfer-Encoding: chunked\r\n\r\n", b"ffffff\r\n")
    assert code == 411 and not node.calls


def test_small_body_is_read_and_the_call_runs(server: ControlServer, node: RecordingNode) -> None:
    code, _ = _request(server, f"POST /drain HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                       f"{TOKEN}\r\nContent-Length: 2\r\n\r\n", b"{}")
    assert code == 200 and node.calls == [("drain", 0.0)]


def test_wrong_or_empty_bearer_is_refused(server: ControlServer, node: RecordingNode) -> None:
    for auth in ("Bearer ", "Bearer wrong", f"bearer {TOKEN}x", ""):
        code, _ = _request(server, f"POST /resume HTTP/1.1\r\nHost: x\r\nAuthorization: "
                           f"{auth}\r\nContent-Length: 0\r\n\r\n")
        assert code == 401, auth
    assert not node.calls


def test_oversized_headers_are_refused(server: ControlServer) -> None:
    filler = "".join(f"X-Pad-{i}: {'a' * 1000}\r\n" for i in range(MAX_HEAD // 1000 + 2))
    code, _ = _request(server, f"GET /status HTTP/1.1\r\nHost: x\r\n{filler}\r\n")
    assert code == 431
    code, _ = _request(server, f"GET /{'a' * (MAX_HEAD + 10)} HTTP/1.1\r\nHost: x\r\n\r\n")
    assert code == 431


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-1", "1e300", "soon"])
def test_non_finite_or_unbounded_parameters_are_refused(
        server: ControlServer, node: RecordingNode, value: str) -> None:
    for route in (f"/flush?timeout={value}", f"/drain?wait={value}"):
        code, payload = _request(server, f"POST {route} HTTP/1.1\r\nHost: x\r\nAuthorization: "
                                 f"Bearer {TOKEN}\r\nContent-Length: 0\r\n\r\n")
        assert code == 400, payload
    assert not node.calls


def test_silent_client_is_disconnected(server: ControlServer) -> None:
    with _connect(server) as sock:
        sock.sendall(b"GET /status HTTP/1.1\r\n")  # and then nothing
        assert sock.recv(1024) == b""  # closed by the idle timeout, before our deadline


def test_status_and_metrics_carry_no_user_info(server: ControlServer) -> None:
    code, payload = _request(server, "GET /status HTTP/1.1\r\nHost: x\r\n\r\n")
    assert code == 200
    text = payload.decode()
    assert "wJalrXUtnFEMI" not in text and "AKIAEXAMPLE" not in text
    assert json.loads(text)["store"] == "http://***@minio.example:9000/bucket"


def test_empty_token_and_open_address_without_token_are_refused(node: RecordingNode) -> None:
    with pytest.raises(ValueError, match="empty"):
        ControlServer(node, "127.0.0.1", 0, "  ")
    with pytest.raises(ValueError, match="needs a token"):
        ControlServer(node, "0.0.0.0", 0, None)


@pytest.mark.parametrize("address", ["0.0.0.0:9464", "10.1.2.3:9464", "[::]:9464",
                                     "node-1:9464"])
def test_config_needs_a_token_off_loopback(address: str) -> None:
    with pytest.raises(ConfigError, match="controlTokenFile"):
        NodeConfig.from_dict({"store": {"url": "s3://ok-bucket"}, "control": address})
    NodeConfig.from_dict({"store": {"url": "s3://ok-bucket"}, "control": address,
                          "controlTokenFile": "/t/token"})
    NodeConfig.from_dict({"store": {"url": "s3://ok-bucket"}, "control": "[::1]:9464"})


def test_daemon_refuses_an_empty_token_file(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("\n")
    config = tmp_path / "node.yaml"
    config.write_text(f"controlTokenFile: {token}\n")
    (tmp_path / "objects").mkdir()
    (tmp_path / "mnt").mkdir()
    process = subprocess.Popen(
        [sys.executable, "-m", "cistern.cachenode.cli", "run", "--config", str(config),
         "--store", f"file://{tmp_path / 'objects'}", "--mount", str(tmp_path / "mnt"),
         "--cache-dir", str(tmp_path / "cache"), "--control", f"127.0.0.1:{free_port()}",
         "--fuse-frontend", "pyfuse3"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ))
    try:
        _, stderr = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:  # it started: the empty token was accepted
        process.kill()
        _, stderr = process.communicate()
    finally:
        if f" {tmp_path / 'mnt'} " in Path("/proc/self/mountinfo").read_text():
            subprocess.run(["fusermount3", "-u", "-z", str(tmp_path / "mnt")], check=False)
    assert process.returncode != 0
    assert "is empty" in stderr, stderr

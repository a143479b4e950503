"""The peer wire protocol, authentication and server against hostile input, in process."""

from __future__ import annotations

import json
import os
import socket
import struct
import time
from pathlib import Path
from typing import Any

import pytest

from cistern.cachenode.peers import auth
from cistern.cachenode.peers.client import PeerPool
from cistern.cachenode.peers.copies import CopyStore
from cistern.cachenode.peers.membership import Member
from cistern.cachenode.peers.protocol import (
    MAX_HEADER,
    MAX_PAYLOAD,
    Frame,
    Op,
    PeerError,
    ProtocolError,
    decode_prelude,
    encode,
    read_frame,
    write_frame,
)
from cistern.cachenode.peers.server import PeerServer
from support.peers import TOKEN, HeldFiles


@pytest.fixture
def server(tmp_path: Path) -> Any:
    srv = PeerServer("127.0.0.1", 0, "holder", TOKEN, CopyStore(tmp_path / "copies"),
                     HeldFiles({"a/b": b"hello peer"}))
    srv.start()
    yield srv
    srv.stop()


def _prelude(magic: bytes = b"CP", version: int = 1, op: int = 1, header: int = 0,
             payload: int = 0) -> bytes:
    return struct.pack("!2sBBIII", magic, version, op, 7, header, payload)


@pytest.mark.parametrize("raw, message", [
    (_prelude(magic=b"XX"), "bad magic"),
    (_prelude(version=9), "version 9"),
    (_prelude(op=200), "unknown op"),
    (_prelude(header=MAX_HEADER + 1), "header length"),
    (_prelude(payload=MAX_PAYLOAD + 1), "payload length"),
])
def test_a_malformed_prelude_is_refused_before_anything_is_read(raw: bytes,
                                                                message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        decode_prelude(raw)


def test_frames_round_trip_and_oversized_frames_are_never_sent() -> None:
    a, b = socket.socketpair()
    with a, b:
        write_frame(a, Frame(Op.READ, 42, {"key": "x", "offset": 1}, b"data"))
        frame = read_frame(b)
        assert (frame.op, frame.request_id, frame.header, frame.payload) == (
            Op.READ, 42, {"key": "x", "offset": 1}, b"data")
    with pytest.raises(ProtocolError):
        encode(Frame(Op.DATA, 1, {}, b"x" * (MAX_PAYLOAD + 1)))
    with pytest.raises(ProtocolError):
        encode(Frame(Op.DATA, 1, {"k": "x" * MAX_HEADER}))


def test_a_header_that_is_not_a_json_object_is_a_protocol_error() -> None:
    a, b = socket.socketpair()
    with a, b:
        body = json.dumps([1, 2]).encode()
        a.sendall(_prelude(header=len(body)) + body)
        with pytest.raises(ProtocolError, match="not a JSON object"):
            read_frame(b)


def _raw_connect(server: PeerServer) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    return sock


def _closed(sock: socket.socket) -> bool:
    """The server closed: EOF, or a reset (it closed with our unread bytes pending)."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_hostile_bytes_get_an_error_frame_and_a_closed_connection(server: PeerServer) -> None:
    with _raw_connect(server) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\n\r\n")
        answer = read_frame(sock)
        assert answer.op == Op.ERROR and "bad magic" in answer.header["message"]
        assert _closed(sock)


def test_a_wrong_token_is_refused_on_both_sides(server: PeerServer) -> None:
    member = Member("holder", "127.0.0.1", server.port)
    bad = PeerPool("writer", b"another-token-of-16-bytes", suspect_for=5)
    with pytest.raises(PeerError, match="authentication"):
        bad.call(member, Op.PING, {}, time.monotonic() + 5)
    # An impostor server (right address, wrong token) is found out by the client too.
    with _raw_connect(server) as sock:
        write_frame(sock, Frame(Op.HELLO, 0, {"node": "writer", "nonce": "n1"}))
        challenge = read_frame(sock)
        assert not auth.verify(b"another-token-of-16-bytes", "server", "n1",
                               challenge.header["nonce"], challenge.header["proof"])
        assert auth.verify(TOKEN, "server", "n1", challenge.header["nonce"],
                           challenge.header["proof"])
        write_frame(sock, Frame(Op.AUTH, 0, {"proof": "0" * 64}))
        assert read_frame(sock).op == Op.ERROR


def test_nothing_but_the_handshake_before_authentication(server: PeerServer) -> None:
    with _raw_connect(server) as sock:
        write_frame(sock, Frame(Op.READ, 1, {"key": "a/b", "offset": 0, "length": 5}))
        answer = read_frame(sock)
        assert answer.op == Op.ERROR and "expected HELLO" in answer.header["message"]


def test_copy_read_and_bounds_over_an_authenticated_connection(server: PeerServer,
                                                               tmp_path: Path) -> None:
    member = Member("holder", "127.0.0.1", server.port)
    pool = PeerPool("writer", TOKEN, suspect_for=5)
    src = tmp_path / "src"
    data = os.urandom(9 * 2**20 + 123)  # three data frames
    src.write_bytes(data)
    fd = os.open(src, os.O_RDONLY)
    try:
        pool.send_copy(member, {"key": "ckpt/shard", "size": len(data), "mtime_ns": 5,
                                "mode": 0o100644, "gen": 1, "etag": None}, fd, len(data),
                       idle=30)
    finally:
        os.close(fd)
    row = server.copies.get("writer", "ckpt/shard")
    assert row is not None and server.copies.data_path(row).read_bytes() == data
    assert CopyStore(tmp_path / "copies").get("writer", "ckpt/shard") == row  # durable rows
    frame = pool.call(member, Op.READ, {"key": "a/b", "offset": 6, "length": 4},
                      time.monotonic() + 5, expect=Op.DATA)
    assert frame.payload == b"peer"
    for bad in ({"key": "../etc/passwd", "offset": 0, "length": 1},
                {"key": "a/b", "offset": -1, "length": 1},
                {"key": "a/b", "offset": 0, "length": MAX_PAYLOAD + 1},
                {"key": "a/b", "offset": "0", "length": 1}):
        with pytest.raises(PeerError, match="field"):
            pool.call(member, Op.READ, bad, time.monotonic() + 5, expect=Op.DATA)


def test_data_beyond_the_declared_size_is_refused(server: PeerServer) -> None:
    member = Member("holder", "127.0.0.1", server.port)
    pool = PeerPool("writer", TOKEN, suspect_for=5)
    with pool.connection(member, time.monotonic() + 5) as conn:
        begin = conn.call(Op.COPY_BEGIN, {"key": "k", "size": 3, "mtime_ns": 0, "mode": 0,
                                          "gen": 1})
        with pytest.raises(PeerError, match="beyond the declared size"):
            conn.call(Op.COPY_DATA, {"copy": begin.header["copy"], "offset": 2}, b"xyz")
    assert server.copies.rows() == []
    assert not list((server.copies.root / "writer").glob("*.part"))


def test_a_silent_peer_costs_one_deadline_then_is_skipped(tmp_path: Path) -> None:
    silent = socket.create_server(("127.0.0.1", 0))  # accepts (backlog), never answers
    with silent:
        member = Member("stopped", "127.0.0.1", silent.getsockname()[1])
        pool = PeerPool("writer", TOKEN, suspect_for=30)
        started = time.monotonic()
        with pytest.raises(PeerError) as caught:
            pool.call(member, Op.PING, {}, started + 0.5)
        assert caught.value.code == "timeout"
        assert not pool.usable(member) and pool.suspects() == ["stopped"]


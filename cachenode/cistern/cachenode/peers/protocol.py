"""The peer wire protocol: length-prefixed frames with strict bounds.

A frame is a 16-byte prelude, a JSON header and an optional binary payload::

    magic "CP" | version u8 | op u8 | request id u32 | header length u32 | payload length u32

Every length is checked against a bound before anything is allocated or read: a header above
``MAX_HEADER`` bytes, a payload above ``MAX_PAYLOAD``, a wrong magic or version, an unknown op
or a header that is not a JSON object raises ``ProtocolError``; the server answers one ERROR
frame (when it still can) and closes the connection.
"""

from __future__ import annotations

import json
import socket
import struct
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

__all__ = [
    "MAGIC",
    "MAX_HEADER",
    "MAX_PAYLOAD",
    "VERSION",
    "Frame",
    "Op",
    "PeerError",
    "ProtocolError",
    "decode_prelude",
    "encode",
    "read_frame",
    "write_frame",
]

MAGIC = b"CP"
VERSION = 1
MAX_HEADER = 64 * 2**10
MAX_PAYLOAD = 8 * 2**20
_PRELUDE = struct.Struct("!2sBBIII")


class Op(IntEnum):
    HELLO = 1        # client -> server: {node, nonce}
    CHALLENGE = 2    # server -> client: {node, nonce, proof}
    AUTH = 3         # client -> server: {proof}
    OK = 4           # any answer without data
    ERROR = 5        # {code, message}
    PING = 10
    COPY_BEGIN = 11  # {origin, key, size, mtime_ns, mode, etag, gen}
    COPY_DATA = 12   # {copy, offset} + payload
    COPY_COMMIT = 13  # {copy, md5}: the holder fsyncs data and row before OK
    DROP = 14        # {origin, key}
    RENAME = 15      # {origin, old, new}: a file or (ending in '/') a directory prefix
    ANNOUNCE = 16    # {origin, key, size, mtime_ns, gen, holders} or {origin, key, gone}
    READ = 17        # {key, offset, length} -> DATA
    DATA = 18        # payload
    RDMA_CONNECT = 19  # {rdma_version, engine, qp} -> OK {qp}: rdma_wire.py
    REGION_OPEN = 20   # {key, offset, length} -> OK {region}: regions.py
    REGION_CLOSE = 21  # {region}
    REGION_READ = 22   # {addr, rkey, length} -> DATA: the TCP engine's one-sided read


class ProtocolError(Exception):
    """The peer broke the protocol (bounds, magic, version, op, header): close the connection."""


class PeerError(Exception):
    """A peer answered ERROR, or could not be reached in time. ``code`` says which."""

    def __init__(self, message: str, code: str = "error") -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Frame:
    op: Op
    request_id: int = 0
    header: dict[str, Any] = field(default_factory=dict)
    payload: bytes = b""


def encode(frame: Frame) -> bytes:
    return _prelude_and_header(frame) + frame.payload


def decode_prelude(data: bytes) -> tuple[Op, int, int, int]:
    """(op, request id, header length, payload length), every field checked."""
    magic, version, op, request_id, header_len, payload_len = _PRELUDE.unpack(data)
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {magic!r}: not a cistern peer")
    if version != VERSION:
        raise ProtocolError(f"protocol version {version} not supported (this node: {VERSION})")
    try:
        kind = Op(op)
    except ValueError:
        raise ProtocolError(f"unknown op {op}") from None
    if header_len > MAX_HEADER:
        raise ProtocolError(f"header length {header_len} exceeds {MAX_HEADER}")
    if payload_len > MAX_PAYLOAD:
        raise ProtocolError(f"payload length {payload_len} exceeds {MAX_PAYLOAD}")
    return kind, request_id, header_len, payload_len


def _read_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            if got == 0 and n == _PRELUDE.size:
                raise EOFError("connection closed")
            raise ProtocolError(f"connection closed after {got} of {n} bytes")
        got += k
    return bytes(buf)


def read_frame(sock: socket.socket) -> Frame:
    """One frame; ``EOFError`` at a clean end, ``ProtocolError`` on anything malformed."""
    op, request_id, header_len, payload_len = decode_prelude(_read_exact(sock, _PRELUDE.size))
    raw = _read_exact(sock, header_len) if header_len else b"{}"
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ProtocolError("header is not JSON") from None
    if not isinstance(header, dict):
        raise ProtocolError("header is not a JSON object")
    payload = _read_exact(sock, payload_len) if payload_len else b""
    return Frame(op, request_id, header, payload)


def write_frame(sock: socket.socket, frame: Frame) -> None:
    if len(frame.payload) < 64 * 2**10:
        sock.sendall(encode(frame))
        return
    # A large payload is sent as is, not copied behind the prelude and header.
    sock.sendall(_prelude_and_header(frame))
    sock.sendall(frame.payload)


def _prelude_and_header(frame: Frame) -> bytes:
    header = json.dumps(frame.header, separators=(",", ":")).encode()
    if len(header) > MAX_HEADER:
        raise ProtocolError(f"header of {len(header)} bytes exceeds {MAX_HEADER}")
    if len(frame.payload) > MAX_PAYLOAD:
        raise ProtocolError(f"payload of {len(frame.payload)} bytes exceeds {MAX_PAYLOAD}")
    return _PRELUDE.pack(MAGIC, VERSION, int(frame.op), frame.request_id & 0xFFFFFFFF,
                         len(header), len(frame.payload)) + header


def field_of(header: dict[str, Any], name: str, kind: type, *, limit: int | None = None) -> Any:
    """A typed, bounded header field; ProtocolError when missing or of the wrong type."""
    value = header.get(name)
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ProtocolError(f"field {name!r}: expected an integer")
    if not isinstance(value, kind):
        raise ProtocolError(f"field {name!r}: expected {kind.__name__}")
    if limit is not None and isinstance(value, int) and not 0 <= value <= limit:
        raise ProtocolError(f"field {name!r}: {value} out of range 0..{limit}")
    if limit is not None and isinstance(value, str) and len(value) > limit:
        raise ProtocolError(f"field {name!r}: longer than {limit}")
    return value

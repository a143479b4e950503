"""Connections to peers: authenticated, pooled, every request under a deadline.

``PeerPool.call`` takes an idle authenticated connection to the member (or opens one: TCP
connect, then the handshake of ``auth``), sends one request and reads its answer with the
socket timeout set to what is left of the deadline. Any error closes that connection. A peer
that timed out is *suspect* for ``suspect_for`` seconds: callers skip it instead of waiting
again (``usable``), so one stopped peer costs a writer one bound, not one per fsync.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from cistern.cachenode.peers import auth
from cistern.cachenode.peers.membership import Member
from cistern.cachenode.peers.protocol import (
    MAX_PAYLOAD,
    Frame,
    Op,
    PeerError,
    ProtocolError,
    read_frame,
    write_frame,
)

__all__ = ["Connection", "LocalFileError", "PeerPool"]

log = logging.getLogger(__name__)

CHUNK = 4 * 2**20
WINDOW = 8
"""Data frames of a copy in flight before the sender reads an acknowledgement."""


class LocalFileError(Exception):
    """The file being sent could not be read here (the peer is not at fault)."""


class Connection:
    def __init__(self, member: Member, self_node: str, token: bytes, deadline: float) -> None:
        self.member = member
        self._ids = itertools.count(1)
        self.one_sided: Any = None
        """The reader's one-sided endpoint on this connection (regions.RegionReads)."""
        self.sock = socket.create_connection((member.host, member.port),
                                             timeout=_left(deadline, member))
        try:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            nonce_c = auth.new_nonce()
            write_frame(self.sock, Frame(Op.HELLO, 0, {"node": self_node, "nonce": nonce_c}))
            challenge = self._expect(read_frame(self.sock), Op.CHALLENGE)
            nonce_s = challenge.header.get("nonce")
            if challenge.header.get("node") != member.node or not isinstance(nonce_s, str) \
                    or not auth.verify(token, "server", nonce_c, nonce_s,
                                       challenge.header.get("proof")):
                raise PeerError(f"peer {member.node}: failed authentication (wrong peer token "
                                "or not the member named)", "auth")
            write_frame(self.sock, Frame(Op.AUTH, 0, {
                "proof": auth.proof(token, "client", nonce_s, nonce_c)}))
            self._expect(read_frame(self.sock), Op.OK)
        except BaseException:
            self.sock.close()
            raise

    def _expect(self, frame: Frame, op: Op) -> Frame:
        if frame.op == Op.ERROR:
            raise PeerError(f"peer {self.member.node}: {frame.header.get('message')}",
                            str(frame.header.get("code", "error")))
        if frame.op != op:
            raise ProtocolError(f"peer {self.member.node}: expected {op.name}, got "
                                f"{frame.op.name}")
        return frame

    def send(self, op: Op, header: dict[str, Any], payload: bytes = b"") -> int:
        request_id = next(self._ids)
        write_frame(self.sock, Frame(op, request_id, header, payload))
        return request_id

    def receive(self, request_id: int, expect: Op = Op.OK) -> Frame:
        frame = read_frame(self.sock)
        if frame.request_id != request_id and frame.op != Op.ERROR:
            raise ProtocolError(f"peer {self.member.node}: answer to request "
                                f"{frame.request_id}, expected {request_id}")
        return self._expect(frame, expect)

    def call(self, op: Op, header: dict[str, Any], payload: bytes = b"",
             expect: Op = Op.OK) -> Frame:
        return self.receive(self.send(op, header, payload), expect)

    def close(self) -> None:
        if self.one_sided is not None:
            self.one_sided.close()
            self.one_sided = None
        self.sock.close()


def _left(deadline: float, member: Member) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise PeerError(f"peer {member.node}: deadline passed", "timeout")
    return left


class PeerPool:
    def __init__(self, self_node: str, token: bytes, suspect_for: float) -> None:
        self.self_node = self_node
        self._token = token
        self.suspect_for = suspect_for
        self._lock = threading.Lock()
        self._idle: dict[Member, list[Connection]] = {}
        self._suspect_until: dict[str, float] = {}
        self.last_error: dict[str, str] = {}

    def usable(self, member: Member) -> bool:
        with self._lock:
            return self._suspect_until.get(member.node, 0.0) <= time.monotonic()

    def suspects(self) -> list[str]:
        now = time.monotonic()
        with self._lock:
            return sorted(n for n, t in self._suspect_until.items() if t > now)

    @contextlib.contextmanager
    def connection(self, member: Member, deadline: float) -> Iterator[Connection]:
        """An authenticated connection, back to the pool if the block ends cleanly."""
        with self._lock:
            idle = self._idle.get(member, [])
            conn = idle.pop() if idle else None
        try:
            if conn is None:
                conn = Connection(member, self.self_node, self._token, deadline)
            conn.sock.settimeout(_left(deadline, member))
            yield conn
        except (OSError, EOFError, ProtocolError, PeerError) as exc:
            if conn is not None:
                conn.close()
            self._failed(member, exc)
            if isinstance(exc, PeerError):
                raise
            code = "timeout" if isinstance(exc, TimeoutError) else "unreachable"
            raise PeerError(f"peer {member.node}: {exc or type(exc).__name__}", code) from exc
        except BaseException:
            if conn is not None:
                conn.close()
            raise
        else:
            with self._lock:
                self._idle.setdefault(member, []).append(conn)
                self._suspect_until.pop(member.node, None)
                self.last_error.pop(member.node, None)

    def _failed(self, member: Member, exc: BaseException) -> None:
        with self._lock:
            self.last_error[member.node] = f"{type(exc).__name__}: {exc}"[:300]
            if not isinstance(exc, PeerError) or exc.code in ("timeout", "unreachable"):
                self._suspect_until[member.node] = time.monotonic() + self.suspect_for
        log.warning("peer %s (%s:%d): %s", member.node, member.host, member.port, exc)

    def call(self, member: Member, op: Op, header: dict[str, Any], deadline: float,
             payload: bytes = b"", expect: Op = Op.OK) -> Frame:
        with self.connection(member, deadline) as conn:
            return conn.call(op, header, payload, expect)

    def send_copy(self, member: Member, header: dict[str, Any], fd: int, size: int,
                  idle: float, on_progress: Callable[[], None] = lambda: None) -> str:
        """BEGIN, the data in chunks (a window of WINDOW unacknowledged), COMMIT with the MD5
        of what was sent: returns it once the holder has the copy durable. ``idle`` bounds
        every wait for an answer (a silent peer fails after it; a slow but live one does
        not, whatever the size); ``on_progress`` is called on every acknowledgement."""
        with self.connection(member, time.monotonic() + idle) as conn:
            conn.sock.settimeout(idle)
            begin = conn.call(Op.COPY_BEGIN, header)
            on_progress()
            copy = begin.header.get("copy")
            pending: list[int] = []
            digest = hashlib.md5()
            offset = 0
            while offset < size:
                try:
                    chunk = os.pread(fd, min(CHUNK, MAX_PAYLOAD, size - offset), offset)
                except OSError as exc:  # the local file, not the peer: never a suspect
                    raise LocalFileError(f"{header.get('key')}: {exc.strerror}") from exc
                if not chunk:
                    raise PeerError(f"{header.get('key')}: local file shrank while sent",
                                    "shrank")
                pending.append(conn.send(Op.COPY_DATA, {"copy": copy, "offset": offset},
                                         chunk))
                digest.update(chunk)
                offset += len(chunk)
                if len(pending) >= WINDOW:
                    conn.receive(pending.pop(0))
                    on_progress()
            for request_id in pending:
                conn.receive(request_id)
                on_progress()
            md5 = digest.hexdigest()
            conn.call(Op.COPY_COMMIT, {"copy": copy, "md5": md5})
            return md5

    def close(self) -> None:
        with self._lock:
            conns = [c for idle in self._idle.values() for c in idle]
            self._idle.clear()
        for conn in conns:
            conn.close()

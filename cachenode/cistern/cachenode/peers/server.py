"""The peer server: one thread per authenticated connection, requests answered in order.

Every request is checked before it touches anything (``protocol.field_of``: types, lengths,
ranges); a ``ProtocolError`` is answered with one ERROR frame and the connection is closed.
An unauthenticated connection gets ``HANDSHAKE_TIMEOUT`` seconds to finish the handshake and
may send nothing else. At most ``MAX_CONNECTIONS`` connections are served at once.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from pathlib import Path
from typing import Any, Protocol

from cistern.cachenode.peers import auth
from cistern.cachenode.peers.copies import CopyStore, check_node_name
from cistern.cachenode.peers.protocol import (
    MAX_PAYLOAD,
    Frame,
    Op,
    PeerError,
    ProtocolError,
    field_of,
    read_frame,
    write_frame,
)
from cistern.cachenode.peers.rdma_wire import MAX_REGION, parse_connect_request
from cistern.cachenode.peers.regions import (
    Engine,
    HolderEndpoint,
    RegionTable,
    Registered,
    RemoteAccessError,
    TcpEngine,
)

__all__ = ["PeerHandler", "PeerServer"]

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 10.0
IDLE_TIMEOUT = 300.0
MAX_CONNECTIONS = 256
MAX_OPEN_COPIES = 64
MAX_FILE = 2**40
MAX_KEY = 1024


class PeerHandler(Protocol):
    """What the server needs from the node around it."""

    def read_local(self, key: str, offset: int, length: int) -> bytes | None:
        """Bytes of ``key`` this node holds dirty or as a copy; None if it has none."""

    def on_announce(self, origin: str, header: dict[str, Any]) -> None:
        """Another node holds ``key`` dirty (or no longer: ``gone``)."""

    def on_rename(self, origin: str, old: str, new: str) -> None:
        """The origin renamed a file (or a directory prefix ending in '/')."""

    def on_drop(self, origin: str, key: str, upto: int | None) -> None:
        """The origin's file is in the store or deleted: its copy is no longer needed."""


class PeerServer:
    def __init__(self, host: str, port: int, self_node: str, token: bytes, copies: CopyStore,
                 handler: PeerHandler, regions: RegionTable | None = None) -> None:
        self.self_node = self_node
        self._token = token
        self.copies = copies
        self.handler = handler
        self.regions = regions or RegionTable({"tcp": TcpEngine()})
        """Buffers registered for one-sided reads, by engine (regions.py)."""
        self._sock = socket.create_server((host, port), reuse_port=False, backlog=64)
        self.port = self._sock.getsockname()[1]
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._stopping = threading.Event()
        self.refused_total = 0

    def start(self) -> None:
        threading.Thread(target=self._accept, name="peer-server", daemon=True).start()

    def stop(self) -> None:
        self._stopping.set()
        self._sock.close()

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, addr = self._sock.accept()
            except OSError:
                return
            if not self._slots.acquire(blocking=False):
                conn.close()
                self.refused_total += 1
                continue
            threading.Thread(target=self._serve, args=(conn, addr), daemon=True,
                             name=f"peer-conn-{addr[0]}").start()

    def _serve(self, conn: socket.socket, addr: Any) -> None:
        session = _Session(self, conn)
        try:
            conn.settimeout(HANDSHAKE_TIMEOUT)
            origin = session.handshake()
            conn.settimeout(IDLE_TIMEOUT)
            session.serve(origin)
        except EOFError:
            pass
        except ProtocolError as exc:
            session.abort_open_copies()  # before the answer: nothing half-received remains
            log.warning("peer connection from %s: %s (closed)", addr[0], exc)
            self.refused_total += 1
            _try_send(conn, Frame(Op.ERROR, 0, {"code": "protocol", "message": str(exc)}))
        except OSError as exc:
            log.info("peer connection from %s: %s", addr[0], exc)
        finally:
            session.abort_open_copies()
            session.release_regions()
            conn.close()
            self._slots.release()


def _try_send(conn: socket.socket, frame: Frame) -> None:
    try:
        conn.settimeout(1.0)
        write_frame(conn, frame)
    except (OSError, ProtocolError):
        pass


class _Session:
    def __init__(self, server: PeerServer, conn: socket.socket) -> None:
        self.server = server
        self.conn = conn
        self.open_copies: dict[int, tuple[Path, int, dict[str, Any]]] = {}
        self._next_copy = 1
        self.engine: Engine | None = None
        self.endpoint: HolderEndpoint | None = None
        self.regions: dict[int, Registered] = {}

    def handshake(self) -> str:
        hello = read_frame(self.conn)
        if hello.op != Op.HELLO:
            raise ProtocolError(f"expected HELLO, got {hello.op.name}")
        try:
            origin = check_node_name(hello.header.get("node"))
        except ValueError as exc:
            raise ProtocolError(str(exc)) from None
        nonce_c = field_of(hello.header, "nonce", str, limit=128)
        nonce_s = auth.new_nonce()
        token = self.server._token
        write_frame(self.conn, Frame(Op.CHALLENGE, 0, {
            "node": self.server.self_node, "nonce": nonce_s,
            "proof": auth.proof(token, "server", nonce_c, nonce_s)}))
        answer = read_frame(self.conn)
        if answer.op != Op.AUTH or not auth.verify(token, "client", nonce_s, nonce_c,
                                                   answer.header.get("proof")):
            raise ProtocolError(f"node {origin}: authentication failed")
        write_frame(self.conn, Frame(Op.OK, 0))
        return origin

    def serve(self, origin: str) -> None:
        while True:
            frame = read_frame(self.conn)
            answer = self.answer(origin, frame)
            answer.request_id = frame.request_id
            write_frame(self.conn, answer)

    def answer(self, origin: str, frame: Frame) -> Frame:
        h = frame.header
        op = frame.op
        copies = self.server.copies
        handler = self.server.handler
        if op == Op.PING:
            return Frame(Op.OK, 0, {"node": self.server.self_node})
        if op == Op.COPY_BEGIN:
            meta = {"key": _key(h, "key"), "size": field_of(h, "size", int, limit=MAX_FILE),
                    "mtime_ns": field_of(h, "mtime_ns", int, limit=2**63),
                    "mode": field_of(h, "mode", int, limit=0o177777),
                    "gen": field_of(h, "gen", int, limit=2**63),
                    "etag": h.get("etag") if isinstance(h.get("etag"), str) else None}
            if len(self.open_copies) >= MAX_OPEN_COPIES:
                raise ProtocolError(f"more than {MAX_OPEN_COPIES} copies open")
            part, fd = copies.begin(origin)
            copy_id = self._next_copy
            self._next_copy += 1
            self.open_copies[copy_id] = (part, fd, meta)
            return Frame(Op.OK, 0, {"copy": copy_id})
        if op == Op.COPY_DATA:
            part, fd, meta = self._copy(h)
            offset = field_of(h, "offset", int, limit=MAX_FILE)
            if offset + len(frame.payload) > meta["size"]:
                raise ProtocolError(f"{meta['key']}: data beyond the declared size")
            os.pwrite(fd, frame.payload, offset)
            return Frame(Op.OK, 0)
        if op == Op.COPY_COMMIT:
            part, fd, meta = self._copy(h)
            md5 = field_of(h, "md5", str, limit=64)
            del self.open_copies[h["copy"]]
            try:
                copies.commit(part, fd, origin=origin, md5=md5, **meta)
            except ValueError as exc:
                return Frame(Op.ERROR, 0, {"code": "corrupt", "message": str(exc)})
            return Frame(Op.OK, 0)
        if op == Op.DROP:
            upto = field_of(h, "upto", int, limit=2**63) if "upto" in h else None
            handler.on_drop(origin, _key(h, "key"), upto)
            return Frame(Op.OK, 0)
        if op == Op.RENAME:
            handler.on_rename(origin, _key(h, "old"), _key(h, "new"))
            return Frame(Op.OK, 0)
        if op == Op.ANNOUNCE:
            _key(h, "key")
            handler.on_announce(origin, h)
            return Frame(Op.OK, 0)
        if op in (Op.RDMA_CONNECT, Op.REGION_OPEN, Op.REGION_CLOSE, Op.REGION_READ):
            return self.answer_region(op, h)
        if op == Op.READ:
            key = _key(h, "key")
            data = handler.read_local(key, field_of(h, "offset", int, limit=MAX_FILE),
                                      field_of(h, "length", int, limit=MAX_PAYLOAD))
            if data is None:
                return Frame(Op.ERROR, 0, {"code": "missing", "message": f"{key}: not here"})
            return Frame(Op.DATA, 0, {}, data)
        raise ProtocolError(f"op {op.name} is not a request")

    def answer_region(self, op: Op, h: dict[str, Any]) -> Frame:
        """The holder's side of one-sided reads (regions.py has the sequence)."""
        table = self.server.regions
        if op == Op.RDMA_CONNECT:
            if self.engine is not None:
                raise ProtocolError("RDMA_CONNECT twice on one connection")
            name, remote = parse_connect_request(h)
            engine = table.engines.get(name)
            if engine is None:
                return _error("rdma-unsupported", f"{self.server.self_node} has no {name} "
                              f"engine (it has: {', '.join(sorted(table.engines))})")
            try:
                self.endpoint = engine.accept(remote)
            except PeerError as exc:
                return _error(exc.code, str(exc))
            self.engine = engine
            info = self.endpoint.local_info()
            return Frame(Op.OK, 0, {"qp": info.to_header()} if info else {})
        if self.engine is None:
            raise ProtocolError(f"{op.name} before RDMA_CONNECT")
        if op == Op.REGION_OPEN:
            key = _key(h, "key")
            length = field_of(h, "length", int, limit=MAX_REGION)
            data = self.server.handler.read_local(key, field_of(h, "offset", int, limit=MAX_FILE),
                                                  length)
            if not data:
                return _error("missing", f"{key}: not here")
            try:
                grant = table.open(self.engine, self.regions, data)
            except PeerError as exc:
                return _error(exc.code, str(exc))
            return Frame(Op.OK, 0, grant.to_header())
        if op == Op.REGION_CLOSE:
            table.close(self.regions, field_of(h, "region", int, limit=2**31))
            return Frame(Op.OK, 0)
        if not isinstance(self.engine, TcpEngine):
            raise ProtocolError(f"REGION_READ on a {self.engine.name} connection")
        try:
            data = self.engine.serve_read(field_of(h, "addr", int, limit=2**64 - 1),
                                          field_of(h, "rkey", int, limit=2**32 - 1),
                                          field_of(h, "length", int, limit=MAX_PAYLOAD))
        except RemoteAccessError as exc:
            # An HCA moves the queue pair to the error state: the connection ends here too.
            raise ProtocolError(str(exc)) from None
        return Frame(Op.DATA, 0, {}, data)

    def release_regions(self) -> None:
        self.server.regions.close_all(self.regions)
        if self.endpoint is not None:
            self.endpoint.close()
            self.endpoint = None

    def _copy(self, h: dict[str, Any]) -> tuple[Path, int, dict[str, Any]]:
        copy_id = field_of(h, "copy", int, limit=2**31)
        found = self.open_copies.get(copy_id)
        if found is None:
            raise ProtocolError(f"no open copy {copy_id}")
        return found

    def abort_open_copies(self) -> None:
        for part, fd, _ in self.open_copies.values():
            self.server.copies.abort(part, fd)
        self.open_copies.clear()


def _error(code: str, message: str) -> Frame:
    return Frame(Op.ERROR, 0, {"code": code, "message": message})


def _key(h: dict[str, Any], name: str) -> str:
    key = field_of(h, name, str, limit=MAX_KEY)
    parts = key.rstrip("/").split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts) \
            or "\0" in key:
        raise ProtocolError(f"field {name!r}: invalid key")
    return key

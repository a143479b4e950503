"""One-sided peer reads: the holder registers bytes, the reader reads them without the
holder's CPU, above any particular device.

The protocol on the authenticated peer connection (frames of ``protocol.py``)::

    reader                                   holder
    RDMA_CONNECT {rdma_version, engine, qp}  -> accept: a connected endpoint for this session
                                             <- OK {qp}       (verbs: the holder's queue pair)
    REGION_OPEN {key, offset, length}        -> stage the bytes, register them, CRC-32
                                             <- OK {region: {region, addr, rkey, length, crc32}}
    one-sided reads of [addr, addr+length) with rkey  (verbs: RDMA READ work requests)
    REGION_CLOSE {region}                    -> deregister
                                             <- OK

An ``Engine`` provides the two device-specific halves: ``register`` (holder) and
``new_reader`` (reader). ``verbs.VerbsEngine`` does it with RC queue pairs and memory
regions; ``TcpEngine`` here is the same contract over the TCP connection itself — a region is
a staging buffer with a random 32-bit rkey at an address in a private address space, and a
one-sided read is a REGION_READ frame that the holder checks exactly as an HCA checks an RDMA
READ (rkey, bounds) — so everything above the device (grants, bounds, CRC, release, fallback)
runs for real on machines without RDMA.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
import zlib
from typing import Any, Protocol

from cistern.cachenode.peers.client import PeerPool
from cistern.cachenode.peers.membership import Member
from cistern.cachenode.peers.protocol import MAX_PAYLOAD, Op, PeerError, ProtocolError
from cistern.cachenode.peers.rdma_wire import (
    MAX_REGION,
    QueuePairInfo,
    RegionGrant,
    connect_request,
)

__all__ = [
    "Engine",
    "Registered",
    "RegionReads",
    "RegionTable",
    "RemoteAccessError",
    "RemoteReader",
    "TcpEngine",
]

log = logging.getLogger(__name__)

MAX_REGISTERED = 256 * 2**20
"""Bytes a holder keeps registered for readers at once; above it REGION_OPEN answers busy."""
MAX_REGIONS_PER_SESSION = 8
RETRY_RDMA_AFTER = 60.0
"""A member whose one-sided read failed is read over TCP for this long, then tried again."""


class RemoteAccessError(Exception):
    """A one-sided read outside a registered region or with the wrong rkey (what an HCA
    reports as a remote access error)."""


class Registered(Protocol):
    addr: int
    rkey: int
    length: int

    def close(self) -> None: ...


class RemoteReader(Protocol):
    """The reader's half of one connection: reads the holder's memory."""

    max_read: int

    def local_info(self) -> QueuePairInfo | None: ...

    def connect(self, remote: QueuePairInfo | None) -> None: ...

    def read(self, addr: int, rkey: int, length: int, timeout: float) -> bytes: ...

    def close(self) -> None: ...


class HolderEndpoint(Protocol):
    """The holder's half of one connection (verbs: its queue pair, connected to the reader's)."""

    def local_info(self) -> QueuePairInfo | None: ...

    def close(self) -> None: ...


class Engine(Protocol):
    name: str

    def register(self, data: bytes) -> Registered: ...

    def accept(self, remote: QueuePairInfo | None) -> HolderEndpoint: ...

    def new_reader(self, conn: Any) -> RemoteReader: ...


# ---------------------------------------------------------------------------- TCP engine


class _TcpRegion:
    def __init__(self, engine: TcpEngine, addr: int, rkey: int, data: bytes) -> None:
        self._engine = engine
        self.addr = addr
        self.rkey = rkey
        self.length = len(data)
        self.data = data

    def close(self) -> None:
        self._engine._deregister(self.addr)


class _NoEndpoint:
    def local_info(self) -> QueuePairInfo | None:
        return None

    def close(self) -> None:
        pass


class _TcpReader:
    max_read = MAX_PAYLOAD

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    def local_info(self) -> QueuePairInfo | None:
        return None

    def connect(self, remote: QueuePairInfo | None) -> None:
        pass

    def read(self, addr: int, rkey: int, length: int, timeout: float) -> bytes:
        self._conn.sock.settimeout(timeout)
        frame = self._conn.call(Op.REGION_READ, {"addr": addr, "rkey": rkey, "length": length},
                                expect=Op.DATA)
        if len(frame.payload) != length:
            raise PeerError(f"one-sided read: {len(frame.payload)} of {length} bytes", "short")
        return frame.payload

    def close(self) -> None:
        pass


class TcpEngine:
    """Regions in a private address space, read with REGION_READ frames (module docstring)."""

    name = "tcp"
    PAGE = 4096

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._regions: dict[int, _TcpRegion] = {}
        self._next_addr = 0x7F00_0000_0000

    def register(self, data: bytes) -> Registered:
        with self._lock:
            addr = self._next_addr
            # a guard page between regions: an overrun never lands in the next one
            self._next_addr += (len(data) // self.PAGE + 2) * self.PAGE
            region = _TcpRegion(self, addr, secrets.randbits(32), data)
            self._regions[addr] = region
            return region

    def _deregister(self, addr: int) -> None:
        with self._lock:
            self._regions.pop(addr, None)

    def accept(self, remote: QueuePairInfo | None) -> HolderEndpoint:
        return _NoEndpoint()

    def new_reader(self, conn: Any) -> RemoteReader:
        return _TcpReader(conn)

    def serve_read(self, addr: int, rkey: int, length: int) -> bytes:
        """The bytes at [addr, addr+length) if one region holds them all and rkey is its key."""
        with self._lock:
            region = next((r for a, r in self._regions.items()
                           if a <= addr < a + r.length), None)
        if region is None or region.rkey != rkey:
            raise RemoteAccessError(f"remote access error: no region with that rkey at {addr:#x}")
        start = addr - region.addr
        if length <= 0 or start + length > region.length:
            raise RemoteAccessError(f"remote access error: {length} bytes at {addr:#x} run past "
                                    f"the region ({region.length} bytes)")
        return region.data[start:start + length]

    def __len__(self) -> int:
        return len(self._regions)


# ---------------------------------------------------------------------------- holder side


class RegionTable:
    """The holder's regions, bounded in bytes overall and in count per session."""

    def __init__(self, engines: dict[str, Engine], max_bytes: int = MAX_REGISTERED) -> None:
        self.engines = engines
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._bytes = 0
        self._ids = iter(range(1, 2**31))
        self.granted_total = 0

    def registered_bytes(self) -> int:
        with self._lock:
            return self._bytes

    def open(self, engine: Engine, owned: dict[int, Registered], data: bytes) -> RegionGrant:
        if len(owned) >= MAX_REGIONS_PER_SESSION:
            raise ProtocolError(f"more than {MAX_REGIONS_PER_SESSION} regions open")
        with self._lock:
            if self._bytes + len(data) > self.max_bytes:
                raise PeerError(f"{self._bytes} bytes registered for readers already", "busy")
            self._bytes += len(data)
            region_id = next(self._ids)
        try:
            registered = engine.register(data)
        except BaseException:
            self._release(len(data))
            raise
        owned[region_id] = registered
        self.granted_total += 1
        return RegionGrant(region=region_id, addr=registered.addr, rkey=registered.rkey,
                           length=registered.length, crc32=zlib.crc32(data))

    def close(self, owned: dict[int, Registered], region_id: int) -> None:
        registered = owned.pop(region_id, None)
        if registered is None:
            raise ProtocolError(f"no open region {region_id}")
        registered.close()
        self._release(registered.length)

    def close_all(self, owned: dict[int, Registered]) -> None:
        for region_id in list(owned):
            self.close(owned, region_id)

    def _release(self, n: int) -> None:
        with self._lock:
            self._bytes -= n


# ---------------------------------------------------------------------------- reader side


class RegionReads:
    """A peer-held file read through one-sided reads, checked against the holder's CRC-32."""

    def __init__(self, engine: Engine, pool: PeerPool, timeout: float) -> None:
        self.engine = engine
        self.pool = pool
        self.timeout = timeout
        self._lock = threading.Lock()
        self._failed_until: dict[str, float] = {}
        self.last_fallback = ""
        self.fallbacks_total = 0
        self.bytes_read_total = 0

    def usable(self, member: Member) -> bool:
        with self._lock:
            return self._failed_until.get(member.node, 0.0) <= time.monotonic()

    def fell_back(self, member: Member, exc: Exception) -> None:
        with self._lock:
            self._failed_until[member.node] = time.monotonic() + RETRY_RDMA_AFTER
            self.fallbacks_total += 1
            self.last_fallback = f"reads from {member.node} fell back to TCP: {exc}"[:300]
        log.warning("one-sided %s reads from peer %s failed, TCP for %.0f s: %s",
                    self.engine.name, member.node, RETRY_RDMA_AFTER, exc)

    def fetch(self, member: Member, key: str, size: int, fd: int) -> None:
        os.ftruncate(fd, 0)
        with self.pool.connection(member, time.monotonic() + self.timeout) as conn:
            conn.sock.settimeout(self.timeout)
            reader = conn.one_sided
            if reader is None:
                reader = self._connect(conn)
                conn.one_sided = reader
            offset = 0
            while offset < size:
                asked = min(MAX_REGION, size - offset)
                answer = conn.call(Op.REGION_OPEN, {"key": key, "offset": offset,
                                                    "length": asked})
                grant = RegionGrant.from_header(answer.header, asked)
                # A failed read leaves the region open: the pool drops this connection on the
                # error, and the holder releases a connection's regions when it ends (a CLOSE
                # here would only meet the closed socket and hide the read's error).
                data = self._read_region(reader, grant)
                conn.call(Op.REGION_CLOSE, {"region": grant.region})
                if zlib.crc32(data) != grant.crc32:
                    raise PeerError(f"{key}: CRC-32 of {grant.length} bytes at {offset} does not "
                                    "match the holder's", "corrupt")
                os.pwrite(fd, data, offset)
                offset += grant.length
        self.bytes_read_total += size

    def _connect(self, conn: Any) -> RemoteReader:
        reader = self.engine.new_reader(conn)
        try:
            answer = conn.call(Op.RDMA_CONNECT, connect_request(self.engine.name,
                                                                reader.local_info()))
            remote = None
            if self.engine.name == "verbs":
                qp = answer.header.get("qp")
                if not isinstance(qp, dict):
                    raise ProtocolError("field 'qp': expected an object")
                remote = QueuePairInfo.from_header(qp)
            reader.connect(remote)
        except BaseException:
            reader.close()
            raise
        return reader

    def _read_region(self, reader: RemoteReader, grant: RegionGrant) -> bytes:
        pieces = []
        at = 0
        while at < grant.length:
            n = min(reader.max_read, grant.length - at)
            pieces.append(reader.read(grant.addr + at, grant.rkey, n, self.timeout))
            at += n
        return b"".join(pieces)

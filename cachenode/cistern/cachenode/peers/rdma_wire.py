"""What two nodes exchange over the authenticated TCP channel to read each other's memory.

RDMA needs no data on the TCP channel, only the facts each side must know about the other:

- ``QueuePairInfo`` — a reliable-connected queue pair's number, its first packet sequence
  number, the port's LID (InfiniBand) and GID (RoCE, or InfiniBand across subnets) and the
  path MTU. The reader sends its own in ``RDMA_CONNECT``; the holder creates a queue pair,
  connects it to the reader's and answers with its own; the reader then connects to that.
- ``RegionGrant`` — a buffer the holder registered for remote reads: its address, remote key
  (``rkey``) and length, plus the CRC-32 of the bytes in it (the reader checks what it read).

Every field is validated on the way in (type, range, overflow of address + length): a peer
that sends a truncated, oversize or malformed description gets a ``ProtocolError`` naming the
field — the connection is closed, nothing is posted to the device with it. ``RDMA_VERSION`` is
sent in ``RDMA_CONNECT``; a node refuses a version it does not speak (the reader then uses TCP
and says why).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

from cistern.cachenode.peers.protocol import ProtocolError, field_of

__all__ = [
    "ENGINES",
    "MAX_REGION",
    "MTUS",
    "RDMA_VERSION",
    "QueuePairInfo",
    "RegionGrant",
    "connect_request",
    "parse_connect_request",
]

RDMA_VERSION = 1
ENGINES = ("verbs", "tcp")
"""``verbs``: RC queue pairs through pyverbs; ``tcp``: the same region protocol with each
one-sided read carried as a REGION_READ frame (the reference implementation, see regions.py)."""
MAX_REGION = 16 * 2**20
"""Largest buffer one grant describes (the holder registers at most this much per request)."""
MTUS = (256, 512, 1024, 2048, 4096)
_GID = re.compile(r"^[0-9a-f]{4}(:[0-9a-f]{4}){7}$")
_U24 = 2**24 - 1
_U32 = 2**32 - 1
_U64 = 2**64 - 1


def _section(header: dict[str, Any], name: str) -> dict[str, Any]:
    value = header.get(name)
    if not isinstance(value, dict):
        raise ProtocolError(f"field {name!r}: expected an object")
    return value


@dataclass(frozen=True)
class QueuePairInfo:
    qpn: int
    """Queue pair number (24 bits; 0 and 1 are the management QPs, never an RC QP)."""
    psn: int
    """The first packet sequence number this side sends with (24 bits)."""
    lid: int
    """The port's local identifier (16 bits; 0 on RoCE)."""
    gid: str
    """The port's GID as eight groups of four hex digits."""
    mtu: int
    """Path MTU in bytes (one of ``MTUS``)."""

    def to_header(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_header(cls, header: dict[str, Any]) -> QueuePairInfo:
        qpn = field_of(header, "qpn", int, limit=_U24)
        if qpn < 2:
            raise ProtocolError(f"field 'qpn': {qpn} is a management queue pair")
        gid = field_of(header, "gid", str, limit=39)
        if not _GID.match(gid):
            raise ProtocolError("field 'gid': expected eight groups of four hex digits")
        mtu = field_of(header, "mtu", int, limit=4096)
        if mtu not in MTUS:
            raise ProtocolError(f"field 'mtu': {mtu} is not one of {MTUS}")
        return cls(qpn=qpn, psn=field_of(header, "psn", int, limit=_U24),
                   lid=field_of(header, "lid", int, limit=0xFFFF), gid=gid, mtu=mtu)


@dataclass(frozen=True)
class RegionGrant:
    region: int
    """The holder's handle for REGION_CLOSE."""
    addr: int
    """Address of the registered buffer in the holder's memory (what RDMA READ targets)."""
    rkey: int
    """The remote key of its memory region (32 bits)."""
    length: int
    """Bytes in it (1..MAX_REGION)."""
    crc32: int
    """CRC-32 of those bytes, computed by the holder before it registered them."""

    def to_header(self) -> dict[str, Any]:
        return {"region": asdict(self)}

    @classmethod
    def from_header(cls, header: dict[str, Any], asked: int) -> RegionGrant:
        """The grant in an answer to a REGION_OPEN of ``asked`` bytes."""
        h = _section(header, "region")
        addr = field_of(h, "addr", int, limit=_U64)
        length = field_of(h, "length", int, limit=MAX_REGION)
        if not 0 < length <= asked:
            raise ProtocolError(f"field 'length': {length} bytes granted for {asked} asked")
        if addr + length > _U64 + 1:
            raise ProtocolError("fields 'addr' + 'length' overflow the address space")
        return cls(region=field_of(h, "region", int, limit=2**31), addr=addr,
                   rkey=field_of(h, "rkey", int, limit=_U32), length=length,
                   crc32=field_of(h, "crc32", int, limit=_U32))


def connect_request(engine: str, qp: QueuePairInfo | None) -> dict[str, Any]:
    header: dict[str, Any] = {"rdma_version": RDMA_VERSION, "engine": engine}
    if qp is not None:
        header["qp"] = qp.to_header()
    return header


def parse_connect_request(header: dict[str, Any]) -> tuple[str, QueuePairInfo | None]:
    """(engine, the reader's queue pair for ``verbs``); ProtocolError if malformed."""
    version = field_of(header, "rdma_version", int, limit=255)
    if version != RDMA_VERSION:
        raise ProtocolError(f"RDMA exchange version {version} not supported "
                            f"(this node: {RDMA_VERSION})")
    engine = field_of(header, "engine", str, limit=16)
    if engine not in ENGINES:
        raise ProtocolError(f"field 'engine': {engine!r} is not one of {ENGINES}")
    if engine != "verbs":
        return engine, None
    return engine, QueuePairInfo.from_header(_section(header, "qp"))

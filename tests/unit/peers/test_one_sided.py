"""One-sided peer reads above the device: the RDMA connection exchange, region grants, the
holder's checks and the reader's fallback to TCP, on a real peer server.

The TCP engine (``regions.TcpEngine``) is the second implementation of the engine contract the
verbs engine implements: regions with random rkeys in a private address space, read by
REGION_READ frames the holder checks as an HCA checks an RDMA READ. Tests that need an RDMA
device are in test_verbs.py.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cistern.cachenode.peers.client import Connection, PeerPool
from cistern.cachenode.peers.copies import CopyStore
from cistern.cachenode.peers.index import IndexEntry
from cistern.cachenode.peers.membership import Member, Membership
from cistern.cachenode.peers.overlay import PeerReader
from cistern.cachenode.peers.protocol import Op, PeerError, ProtocolError
from cistern.cachenode.peers.rdma_wire import (
    MAX_REGION,
    RDMA_VERSION,
    QueuePairInfo,
    RegionGrant,
    connect_request,
    parse_connect_request,
)
from cistern.cachenode.peers.regions import (
    RegionReads,
    RegionTable,
    RemoteAccessError,
    TcpEngine,
)
from cistern.cachenode.peers.server import PeerServer
from support.peers import TOKEN, HeldFiles

GID = "fe80:0000:0000:0000:0202:c9ff:fe00:0001"
QP = {"qpn": 0x1A2B, "psn": 0xABCDE, "lid": 7, "gid": GID, "mtu": 4096}


class CorruptingEngine(TcpEngine):
    """A holder whose one-sided reads return a flipped byte (a faulty NIC or memory)."""

    def serve_read(self, addr: int, rkey: int, length: int) -> bytes:
        data = bytearray(super().serve_read(addr, rkey, length))
        data[0] ^= 0xFF
        return bytes(data)


class RevokingEngine(TcpEngine):
    """A holder that refuses every one-sided read (its regions went away: the remote access
    error an HCA reports, which ends the connection)."""

    def serve_read(self, addr: int, rkey: int, length: int) -> bytes:
        raise RemoteAccessError(f"remote access error: region at {addr:#x} revoked")


BIG = os.urandom(MAX_REGION + 3 * 2**20 + 17)  # two regions, the first read in two pieces


def _server(tmp_path: Path, engine: TcpEngine) -> PeerServer:
    table = RegionTable({"tcp": engine})
    srv = PeerServer("127.0.0.1", 0, "holder", TOKEN, CopyStore(tmp_path / "copies"),
                     HeldFiles({"ckpt/shard": BIG, "small": b"hello regions"}), table)
    srv.start()
    return srv


@pytest.fixture
def server(tmp_path: Path) -> Iterator[PeerServer]:
    srv = _server(tmp_path, TcpEngine())
    yield srv
    srv.stop()


def _member(server: PeerServer) -> Member:
    return Member("holder", "127.0.0.1", server.port)


def _connect(server: PeerServer) -> Connection:
    return Connection(_member(server), "reader", TOKEN, time.monotonic() + 5)


# ------------------------------------------------------------------ the exchange's framing


def test_queue_pair_info_and_grants_round_trip() -> None:
    info = QueuePairInfo.from_header(QP)
    assert info.to_header() == QP
    engine, qp = parse_connect_request(json.loads(json.dumps(connect_request("verbs", info))))
    assert (engine, qp) == ("verbs", info)
    assert parse_connect_request(connect_request("tcp", None)) == ("tcp", None)
    grant = RegionGrant(region=3, addr=2**63, rkey=0xDEADBEEF, length=4096, crc32=12345)
    assert RegionGrant.from_header(grant.to_header(), asked=4096) == grant


@pytest.mark.parametrize("change, field", [
    ({"qpn": 1}, "qpn"),                 # a management queue pair
    ({"qpn": 2**24}, "qpn"),             # wider than 24 bits
    ({"psn": -1}, "psn"),
    ({"lid": 2**16}, "lid"),
    ({"gid": "fe80::1"}, "gid"),         # the compressed form is not what pyverbs takes
    ({"gid": 12}, "gid"),
    ({"mtu": 1500}, "mtu"),
    ({"qpn": True}, "qpn"),              # a JSON boolean is not a number
    ({"qpn": None}, "qpn"),
])
def test_a_malformed_queue_pair_is_refused_naming_the_field(change: dict[str, Any],
                                                            field: str) -> None:
    with pytest.raises(ProtocolError, match=field):
        QueuePairInfo.from_header({**QP, **change})


@pytest.mark.parametrize("header, message", [
    ({"engine": "tcp"}, "rdma_version"),
    ({"rdma_version": RDMA_VERSION + 1, "engine": "tcp"}, "version 2 not supported"),
    ({"rdma_version": RDMA_VERSION, "engine": "iwarp"}, "engine"),
    ({"rdma_version": RDMA_VERSION, "engine": "verbs"}, "'qp'"),
    ({"rdma_version": RDMA_VERSION, "engine": "verbs", "qp": [1, 2]}, "'qp'"),
])
def test_a_bad_connect_request_is_refused(header: dict[str, Any], message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        parse_connect_request(header)


@pytest.mark.parametrize("region, asked, message", [
    ({"region": 1, "addr": 4096, "rkey": 5, "length": 0, "crc32": 0}, 10, "length"),
    ({"region": 1, "addr": 4096, "rkey": 5, "length": 11, "crc32": 0}, 10, "11 bytes granted"),
    ({"region": 1, "addr": 4096, "rkey": 5, "length": MAX_REGION + 1, "crc32": 0},
     MAX_REGION + 1, "length"),
    ({"region": 1, "addr": 2**64 - 4, "rkey": 5, "length": 8, "crc32": 0}, 8, "overflow"),
    ({"region": 1, "addr": 4096, "rkey": 2**32, "length": 8, "crc32": 0}, 8, "rkey"),
    ({"region": 1, "addr": 4096, "rkey": -1, "length": 8, "crc32": 0}, 8, "rkey"),
    ({"region": 1, "addr": "4096", "rkey": 5, "length": 8, "crc32": 0}, 8, "addr"),
    ({"region": 1, "addr": 4096, "rkey": 5, "length": 8}, 8, "crc32"),
])
def test_a_bad_grant_is_refused_before_anything_is_read(region: dict[str, Any], asked: int,
                                                        message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        RegionGrant.from_header({"region": region}, asked)
    with pytest.raises(ProtocolError, match="region"):
        RegionGrant.from_header({"region": "everything"}, asked)


# ------------------------------------------------------------------ the holder's side


def test_regions_are_read_and_released(server: PeerServer) -> None:
    conn = _connect(server)
    try:
        conn.call(Op.RDMA_CONNECT, connect_request("tcp", None))
        grant = RegionGrant.from_header(conn.call(Op.REGION_OPEN, {
            "key": "small", "offset": 6, "length": 7}).header, 7)
        assert server.regions.registered_bytes() == 7
        data = conn.call(Op.REGION_READ, {"addr": grant.addr + 1, "rkey": grant.rkey,
                                          "length": 6}, expect=Op.DATA).payload
        assert data == b"egions"
        conn.call(Op.REGION_CLOSE, {"region": grant.region})
        assert server.regions.registered_bytes() == 0
        # A closed region is gone: its rkey no longer opens anything (and ends the connection).
        with pytest.raises(PeerError, match="remote access error"):
            conn.call(Op.REGION_READ, {"addr": grant.addr, "rkey": grant.rkey, "length": 1},
                      expect=Op.DATA)
    finally:
        conn.close()


@pytest.mark.parametrize("read, message", [
    (lambda g: {"addr": g.addr, "rkey": g.rkey ^ 1, "length": 4}, "no region with that rkey"),
    (lambda g: {"addr": g.addr + 8, "rkey": g.rkey, "length": 6}, "run past the region"),
    (lambda g: {"addr": g.addr - 1, "rkey": g.rkey, "length": 1}, "no region"),
    (lambda g: {"addr": g.addr, "rkey": g.rkey, "length": 0}, "run past"),
    (lambda g: {"addr": g.addr, "rkey": "key", "length": 1}, "rkey"),
])
def test_a_read_outside_a_region_or_with_a_wrong_rkey_ends_the_connection(
        server: PeerServer, read: Any, message: str) -> None:
    conn = _connect(server)
    try:
        conn.call(Op.RDMA_CONNECT, connect_request("tcp", None))
        grant = RegionGrant.from_header(conn.call(Op.REGION_OPEN, {
            "key": "small", "offset": 0, "length": 13}).header, 13)
        with pytest.raises(PeerError, match=message):
            conn.call(Op.REGION_READ, read(grant), expect=Op.DATA)
        assert conn.sock.recv(1) == b""  # closed, like a queue pair in the error state
    finally:
        conn.close()
    # The session's regions went with it; the server still serves the next reader.
    assert server.regions.registered_bytes() == 0
    next_one = _connect(server)
    next_one.call(Op.PING, {})
    next_one.close()


def test_region_requests_need_the_exchange_first_and_a_bounded_length(
        server: PeerServer) -> None:
    for request, header, message in (
            (Op.REGION_OPEN, {"key": "small", "offset": 0, "length": 1}, "before RDMA_CONNECT"),
            (Op.REGION_OPEN, {"key": "small", "offset": 0, "length": MAX_REGION + 1},
             "length"),
            (Op.REGION_CLOSE, {"region": 99}, "no open region"),
            (Op.RDMA_CONNECT, connect_request("tcp", None), "twice")):
        conn = _connect(server)
        try:
            if request != Op.REGION_OPEN or "before" not in message:
                conn.call(Op.RDMA_CONNECT, connect_request("tcp", None))
            with pytest.raises(PeerError, match=message):
                conn.call(request, header)
        finally:
            conn.close()


def test_an_engine_the_holder_lacks_is_refused_and_the_connection_stays(
        server: PeerServer) -> None:
    conn = _connect(server)
    try:
        with pytest.raises(PeerError, match="has no verbs engine") as caught:
            conn.call(Op.RDMA_CONNECT, connect_request("verbs", QueuePairInfo(**QP)))
        assert caught.value.code == "rdma-unsupported"
        conn.call(Op.PING, {})  # not a protocol error: the same connection goes on
        missing = conn.call(Op.RDMA_CONNECT, connect_request("tcp", None))
        assert missing.op == Op.OK
        with pytest.raises(PeerError, match="not here"):
            conn.call(Op.REGION_OPEN, {"key": "nope", "offset": 0, "length": 1})
    finally:
        conn.close()


def test_a_truncated_exchange_frame_costs_the_holder_nothing(server: PeerServer) -> None:
    conn = _connect(server)
    header = json.dumps(connect_request("verbs", QueuePairInfo(**QP))).encode()
    prelude = struct.pack("!2sBBIII", b"CP", 1, int(Op.RDMA_CONNECT), 1, len(header), 0)
    conn.sock.sendall(prelude + header[:len(header) // 2])
    conn.sock.shutdown(socket.SHUT_WR)
    assert conn.sock.recv(1024)[:2] in (b"", b"CP")  # an ERROR frame or just the close
    conn.close()
    after = _connect(server)
    after.call(Op.PING, {})
    after.close()


def test_the_holder_bounds_the_bytes_it_keeps_registered(tmp_path: Path) -> None:
    engine = TcpEngine()
    srv = PeerServer("127.0.0.1", 0, "holder", TOKEN, CopyStore(tmp_path / "copies"),
                     HeldFiles({"f": b"x" * 100}), RegionTable({"tcp": engine}, max_bytes=150))
    srv.start()
    conn = Connection(_member(srv), "reader", TOKEN, time.monotonic() + 5)
    try:
        conn.call(Op.RDMA_CONNECT, connect_request("tcp", None))
        conn.call(Op.REGION_OPEN, {"key": "f", "offset": 0, "length": 100})
        with pytest.raises(PeerError, match="registered for readers") as caught:
            conn.call(Op.REGION_OPEN, {"key": "f", "offset": 0, "length": 100})
        assert caught.value.code == "busy"
    finally:
        conn.close()
        srv.stop()


# ------------------------------------------------------------------ the reader's side


def _reader(tmp_path: Path, server: PeerServer, reads: RegionReads) -> PeerReader:
    members = tmp_path / "members.json"
    members.write_text(json.dumps({"members": [
        {"node": "holder", "host": "127.0.0.1", "port": server.port},
        {"node": "reader", "host": "127.0.0.1", "port": 1}]}))
    return PeerReader(reads.pool, Membership(members, "reader"), 10.0,
                      local=lambda key, offset, length: None, one_sided=reads)


def _entry(key: str, size: int) -> IndexEntry:
    return IndexEntry(key=key, origin="holder", size=size, mtime_ns=1, version=1,
                      holders=())


def _fetched(path: Path, fetch: Callable[[int], object]) -> bytes:
    """What ``fetch`` wrote into a new file at ``path`` (it must say it read: truthy)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        assert fetch(fd) is not False
    finally:
        os.close(fd)
    return path.read_bytes()


def test_a_file_is_read_through_regions_and_checked(tmp_path: Path,
                                                    server: PeerServer) -> None:
    reads = RegionReads(TcpEngine(), PeerPool("reader", TOKEN, suspect_for=5), timeout=10.0)
    reader = _reader(tmp_path, server, reads)
    assert _fetched(tmp_path / "a", lambda fd: reader.fetch(_entry("ckpt/shard", len(BIG)),
                                                            fd)) == BIG
    # the same connection, exchanged once
    assert _fetched(tmp_path / "b", lambda fd: reader.fetch(_entry("small", 13), fd)) \
        == b"hello regions"
    assert reads.bytes_read_total == len(BIG) + 13 and reads.fallbacks_total == 0
    assert server.regions.granted_total == 3 and server.regions.registered_bytes() == 0


@pytest.mark.parametrize("engine, why", [(CorruptingEngine, "CRC-32"),
                                          (RevokingEngine, "revoked")])
def test_a_bad_one_sided_read_falls_back_to_tcp_and_says_why(tmp_path: Path,
                                                             engine: type[TcpEngine],
                                                             why: str) -> None:
    server = _server(tmp_path, engine())
    try:
        reads = RegionReads(TcpEngine(), PeerPool("reader", TOKEN, suspect_for=5), timeout=10.0)
        reader = _reader(tmp_path, server, reads)
        # from the TCP READs after the failed one-sided read
        assert _fetched(tmp_path / "out", lambda fd: reader.fetch(
            _entry("ckpt/shard", len(BIG)), fd)) == BIG
        assert reads.fallbacks_total == 1
        assert "reads from holder fell back to TCP" in reads.last_fallback
        assert why in reads.last_fallback
        assert not reads.usable(_member(server))  # TCP for a while, not one failure per read
        assert reads.pool.usable(_member(server))  # the member itself is fine
        assert server.regions.registered_bytes() == 0
    finally:
        server.stop()

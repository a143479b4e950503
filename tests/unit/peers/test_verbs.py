"""The verbs engine: what runs without a device here, and the RDMA READ path where one exists.

The device tests use two engines on this machine's first RDMA device (a loopback pair of RC
queue pairs: the holder's region is read by the reader's RDMA READ). They skip, printing why,
where detection finds no usable device (docs/dev/peers.md has the runbook for an RDMA pair).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cistern.cachenode.peers.client import Connection, PeerPool
from cistern.cachenode.peers.copies import CopyStore
from cistern.cachenode.peers.membership import Member
from cistern.cachenode.peers.protocol import Op, PeerError
from cistern.cachenode.peers.rdma_wire import (
    MAX_REGION,
    QueuePairInfo,
    RegionGrant,
    connect_request,
)
from cistern.cachenode.peers.regions import Engine, RegionReads, RegionTable, TcpEngine
from cistern.cachenode.peers.server import PeerServer
from cistern.cachenode.peers.transport import TransportChoice, detect_rdma, open_engine
from support.peers import TOKEN, HeldFiles

DEVICES, NO_DEVICE = detect_rdma()


def test_the_verbs_module_imports_without_pyverbs() -> None:
    """Nodes without rdma-core import the peer package, and detection finds out there is no
    device before it imports pyverbs: pyverbs is loaded only when there is a device."""
    if not NO_DEVICE:
        pytest.skip(f"this machine has a usable RDMA device ({', '.join(DEVICES)})")
    code = ("import sys, cistern.cachenode.peers.node, cistern.cachenode.peers.verbs; "
            "from cistern.cachenode.peers.transport import choose_transport; "
            "choose_transport('auto'); "
            "print(sorted(m for m in sys.modules if m.startswith('pyverbs')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)
    assert out.stdout.strip() == "[]"


def test_a_device_that_cannot_be_opened_falls_back_to_tcp_with_the_reason() -> None:
    """Detection saw a device, opening it failed (gone, no active port, pyverbs missing)."""
    engine, choice = open_engine(TransportChoice("rdma", "RDMA devices nodev0 usable",
                                                 ("nodev0",)))
    assert engine is None
    assert choice.name == "tcp" and choice.reason.startswith("fallback to TCP: ")
    assert len(choice.reason) > len("fallback to TCP: ")
    assert open_engine(TransportChoice("tcp", "configured")) == (None, TransportChoice(
        "tcp", "configured"))


def test_the_verbs_objects_are_what_an_rc_read_needs() -> None:
    """The QP attributes and the READ work request, built with the installed pyverbs (they
    need no device): catches a pyverbs API the engine does not match before a node does."""
    pytest.importorskip("pyverbs.qp", reason="pyverbs is not installed (the 'rdma' extra, or "
                        "the distribution's python3-pyverbs)")
    from cistern.cachenode.peers.verbs import (
        _enums,
        init_attributes,
        read_request,
        rts_attributes,
    )

    e = _enums()
    assert init_attributes().qp_access_flags & e.ibv_access_flags.IBV_ACCESS_REMOTE_READ
    local = QueuePairInfo(qpn=100, psn=5, lid=0, gid="fe80:0000:0000:0000:0202:c9ff:fe00:0001",
                          mtu=4096)
    remote = QueuePairInfo(qpn=200, psn=7, lid=3, mtu=1024,
                           gid="fe80:0000:0000:0000:0202:c9ff:fe00:0002")
    attr = rts_attributes(local, remote, gid_index=1)
    assert (attr.dest_qp_num, attr.rq_psn, attr.sq_psn) == (200, 7, 5)
    assert attr.path_mtu == e.ibv_mtu.IBV_MTU_1024  # the smaller of both sides
    assert (attr.max_rd_atomic, attr.max_dest_rd_atomic) == (1, 1)
    assert (attr.ah_attr.dlid, attr.ah_attr.is_global, attr.ah_attr.sgid_index) == (3, 1, 1)
    assert str(attr.ah_attr.dgid) == remote.gid
    wr = read_request(9, 4096, 11, 0x7F00_0000_0000, 0xDEAD, 2**20)
    assert (wr.wr_id, wr.opcode, wr.num_sge) == (9, e.ibv_wr_opcode.IBV_WR_RDMA_READ, 1)


@pytest.fixture
def engines() -> Iterator[tuple[Engine, Engine]]:
    if NO_DEVICE:
        pytest.skip(f"needs an RDMA device: {NO_DEVICE}")
    holder, reader = open_engine(TransportChoice("rdma", "test", DEVICES))[0], \
        open_engine(TransportChoice("rdma", "test", DEVICES))[0]
    if holder is None or reader is None:
        pytest.skip(f"RDMA device {DEVICES[0]} cannot be opened")
    yield holder, reader


def _server(tmp_path: Path, holder: Engine, files: dict[str, bytes]) -> PeerServer:
    srv = PeerServer("127.0.0.1", 0, "holder", TOKEN, CopyStore(tmp_path / "copies"),
                     HeldFiles(files), RegionTable({"verbs": holder, "tcp": TcpEngine()}))
    srv.start()
    return srv


def test_rdma_reads_of_registered_regions(tmp_path: Path,
                                          engines: tuple[Engine, Engine]) -> None:
    data = os.urandom(MAX_REGION + 5 * 2**20 + 3)
    srv = _server(tmp_path, engines[0], {"ckpt/shard": data})
    try:
        reads = RegionReads(engines[1], PeerPool("reader", TOKEN, suspect_for=5), timeout=10.0)
        out = tmp_path / "out"
        fd = os.open(out, os.O_RDWR | os.O_CREAT)
        started = time.monotonic()
        try:
            reads.fetch(Member("holder", "127.0.0.1", srv.port), "ckpt/shard", len(data), fd)
        finally:
            os.close(fd)
        elapsed = time.monotonic() - started
        assert out.read_bytes() == data
        assert srv.regions.registered_bytes() == 0
        print(json.dumps({"rdma_read_MiB_s": round(len(data) / 2**20 / elapsed, 1)}))
    finally:
        srv.stop()


def test_an_rdma_read_with_a_wrong_rkey_fails_cleanly(tmp_path: Path,
                                                     engines: tuple[Engine, Engine]) -> None:
    srv = _server(tmp_path, engines[0], {"f": b"x" * 4096})
    conn = Connection(Member("holder", "127.0.0.1", srv.port), "reader", TOKEN,
                      time.monotonic() + 5)
    try:
        reader = engines[1].new_reader(conn)
        answer = conn.call(Op.RDMA_CONNECT, connect_request("verbs", reader.local_info()))
        reader.connect(QueuePairInfo.from_header(answer.header["qp"]))
        grant = RegionGrant.from_header(conn.call(Op.REGION_OPEN, {
            "key": "f", "offset": 0, "length": 4096}).header, 4096)
        assert reader.read(grant.addr, grant.rkey, 4096, 5.0) == b"x" * 4096
        with pytest.raises(PeerError, match="status") as caught:
            reader.read(grant.addr, grant.rkey ^ 0x5A5A, 4096, 5.0)
        assert caught.value.code == "rdma"
        reader.close()
    finally:
        conn.close()
        srv.stop()

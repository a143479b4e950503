"""The RDMA engine: RC queue pairs, memory regions and RDMA READs through pyverbs.

The only module that imports ``pyverbs`` (an import-linter contract holds it there), and only
when a node opens a device, so nodes without rdma-core run unchanged. It implements
``regions.Engine``:

- holder: ``register`` copies the bytes into a memory region registered with
  ``IBV_ACCESS_REMOTE_READ`` (a staging buffer: the data file may change or be evicted while a
  reader reads, the region may not); ``accept`` creates an RC queue pair and connects it to the
  reader's (INIT → RTR → RTS, remote reads allowed);
- reader: ``new_reader`` creates an RC queue pair and a local region (``LOCAL_WRITE``) of
  ``MAX_REGION`` bytes; ``read`` posts one ``IBV_WR_RDMA_READ`` work request of the holder's
  (addr, rkey, length) into it, polls the completion queue until the deadline and copies the
  bytes out.

Every pyverbs error becomes a ``PeerError`` with code ``rdma``: the caller falls back to TCP
for that member and reports why. Not exercised on this machine (no RDMA device, no kernel
support): docs/dev/peers.md has the runbook for an RDMA pair.
"""

from __future__ import annotations

import contextlib
import importlib
import secrets
import time
from collections.abc import Iterator
from typing import Any

from cistern.cachenode.peers.protocol import PeerError
from cistern.cachenode.peers.rdma_wire import MAX_REGION, MTUS, QueuePairInfo

__all__ = ["VerbsEngine", "init_attributes", "read_request", "rts_attributes"]

PORT = 1
QUEUE_DEPTH = 4
RETRY_COUNT = 7
ACK_TIMEOUT = 14  # 4.096 µs · 2^14 ≈ 67 ms per transport retry
ZERO_GID = "0000:0000:0000:0000:0000:0000:0000:0000"


def _enums() -> Any:
    """libibverbs' enums: ``pyverbs.libibverbs_enums`` since rdma-core 50, ``pyverbs.enums``
    before (Debian 12 ships 44, Ubuntu 22.04 39)."""
    try:
        return importlib.import_module("pyverbs.libibverbs_enums")
    except ImportError:
        return importlib.import_module("pyverbs.enums")


@contextlib.contextmanager
def _verbs_errors(what: str) -> Iterator[None]:
    from pyverbs.pyverbs_error import PyverbsError

    try:
        yield
    except PyverbsError as exc:
        raise PeerError(f"RDMA {what}: {exc}", "rdma") from exc


def init_attributes() -> Any:
    """RESET -> INIT of an RC queue pair. Given a QPAttr at creation, pyverbs makes this
    transition with it: the access flags (remote reads of this side's regions) are set here,
    not in RTR or RTS."""
    ibv_access_flags = _enums().ibv_access_flags
    from pyverbs.qp import QPAttr

    attr = QPAttr(port_num=PORT)
    attr.qp_access_flags = (ibv_access_flags.IBV_ACCESS_LOCAL_WRITE
                            | ibv_access_flags.IBV_ACCESS_REMOTE_READ)
    return attr


def rts_attributes(local: QueuePairInfo, remote: QueuePairInfo, gid_index: int) -> Any:
    """INIT -> RTR -> RTS towards ``remote``: its QPN, its first PSN as the receive PSN, ours
    as the send PSN, the smaller MTU, one outstanding READ each way, a global route to its GID
    (RoCE needs it; InfiniBand takes it too) and its LID."""
    from pyverbs.addr import GID, AHAttr, GlobalRoute
    ibv_mtu = _enums().ibv_mtu
    from pyverbs.qp import QPAttr

    attr = QPAttr(port_num=PORT)
    attr.path_mtu = getattr(ibv_mtu, f"IBV_MTU_{min(local.mtu, remote.mtu)}")
    attr.dest_qp_num = remote.qpn
    attr.rq_psn = remote.psn
    attr.sq_psn = local.psn
    attr.max_dest_rd_atomic = 1
    attr.max_rd_atomic = 1
    attr.min_rnr_timer = 12
    attr.timeout = ACK_TIMEOUT
    attr.retry_cnt = RETRY_COUNT
    attr.rnr_retry = RETRY_COUNT
    route = GlobalRoute(dgid=GID(remote.gid), sgid_index=gid_index)
    attr.ah_attr = AHAttr(port_num=PORT, is_global=1, gr=route, dlid=remote.lid)
    return attr


def read_request(wr_id: int, local_addr: int, lkey: int, remote_addr: int, rkey: int,
                 length: int) -> Any:
    """One signalled RDMA READ of [remote_addr, +length) with ``rkey`` into the local buffer."""
    ibv_wr_opcode = _enums().ibv_wr_opcode
    from pyverbs.wr import SGE, SendWR

    wr = SendWR(wr_id=wr_id, opcode=ibv_wr_opcode.IBV_WR_RDMA_READ, num_sge=1,
                sg=[SGE(local_addr, length, lkey)])
    wr.set_wr_rdma(rkey, remote_addr)
    return wr


class _Region:
    def __init__(self, mr: Any) -> None:
        self._mr = mr
        self.addr = int(mr.buf)
        self.rkey = int(mr.rkey)
        self.length = int(mr.length)

    def close(self) -> None:
        self._mr.close()


class _QueuePair:
    """One RC queue pair with its own completion queue; both the holder's and the reader's."""

    def __init__(self, engine: VerbsEngine) -> None:
        from pyverbs.cq import CQ
        ibv_qp_type = _enums().ibv_qp_type
        from pyverbs.qp import QP, QPCap, QPInitAttr

        self.engine = engine
        with _verbs_errors("queue pair"):
            self.cq = CQ(engine.ctx, QUEUE_DEPTH, None, None, 0)
            cap = QPCap(max_send_wr=QUEUE_DEPTH, max_recv_wr=1, max_send_sge=1, max_recv_sge=1)
            self.qp = QP(engine.pd, QPInitAttr(qp_type=ibv_qp_type.IBV_QPT_RC, scq=self.cq,
                                               rcq=self.cq, cap=cap), init_attributes())
        self.psn = secrets.randbits(24)

    def local_info(self) -> QueuePairInfo | None:
        e = self.engine
        return QueuePairInfo(qpn=int(self.qp.qp_num), psn=self.psn, lid=e.lid, gid=e.gid,
                             mtu=e.mtu)

    def connect(self, remote: QueuePairInfo | None) -> None:
        if remote is None:
            raise PeerError("RDMA connect: the peer sent no queue pair", "rdma")
        local = self.local_info()
        assert local is not None
        with _verbs_errors("connect"):
            self.qp.to_rts(rts_attributes(local, remote, self.engine.gid_index))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.qp.close()
            self.cq.close()


class _Reader(_QueuePair):
    max_read = MAX_REGION

    def __init__(self, engine: VerbsEngine) -> None:
        ibv_access_flags = _enums().ibv_access_flags
        from pyverbs.mr import MR

        super().__init__(engine)
        with _verbs_errors("local region"):
            self.mr = MR(engine.pd, MAX_REGION, ibv_access_flags.IBV_ACCESS_LOCAL_WRITE)
        self._wr_ids = 0

    def read(self, addr: int, rkey: int, length: int, timeout: float) -> bytes:
        ibv_wc_status = _enums().ibv_wc_status

        self._wr_ids += 1
        with _verbs_errors("read"):
            self.qp.post_send(read_request(self._wr_ids, self.mr.buf, self.mr.lkey, addr, rkey,
                                           length))
            deadline = time.monotonic() + timeout
            while True:
                polled, completions = self.cq.poll(1)
                if polled:
                    break
                if time.monotonic() > deadline:
                    # The request is still posted: this queue pair and its region must not be
                    # reused (the caller closes the connection and with it this reader).
                    raise PeerError(f"RDMA READ of {length} bytes: no completion in "
                                    f"{timeout:.1f} s", "timeout")
                time.sleep(0)
            status = completions[0].status
            if status != ibv_wc_status.IBV_WC_SUCCESS:
                raise PeerError(f"RDMA READ completed with status {status}", "rdma")
            return bytes(self.mr.read(length, 0))

    def close(self) -> None:
        super().close()
        with contextlib.suppress(Exception):
            self.mr.close()


class VerbsEngine:
    """One opened RDMA device: its context, protection domain and port addressing."""

    name = "verbs"

    def __init__(self, device: str) -> None:
        from pyverbs.device import Context
        ibv_port_state = _enums().ibv_port_state
        from pyverbs.pd import PD

        with _verbs_errors(f"device {device}"):
            self.ctx = Context(name=device)
            self.pd = PD(self.ctx)
            port = self.ctx.query_port(PORT)
            if port.state != ibv_port_state.IBV_PORT_ACTIVE:
                raise PeerError(f"RDMA device {device} port {PORT} is not active", "rdma")
            self.lid = int(port.lid)
            self.mtu = MTUS[int(port.active_mtu) - 1]
            self.gid_index, self.gid = self._pick_gid(int(port.gid_tbl_len))
        self.device = device

    def _pick_gid(self, entries: int) -> tuple[int, str]:
        """The first RoCE v2 GID of the port, else its first non-zero GID (InfiniBand)."""
        ibv_gid_type_sysfs = _enums().ibv_gid_type_sysfs

        found: list[tuple[int, str]] = []
        for index in range(entries):
            try:
                gid = str(self.ctx.query_gid(PORT, index).gid)
            except Exception:  # unpopulated entries raise on some drivers
                continue
            if gid == ZERO_GID:
                continue
            try:
                kind = self.ctx.query_gid_type(PORT, index)
            except Exception:
                kind = None
            if kind == ibv_gid_type_sysfs.IBV_GID_TYPE_SYSFS_ROCE_V2:
                return index, gid
            found.append((index, gid))
        if not found:
            raise PeerError(f"RDMA port {PORT} has no GID", "rdma")
        return found[0]

    def register(self, data: bytes) -> _Region:
        ibv_access_flags = _enums().ibv_access_flags
        from pyverbs.mr import MR

        with _verbs_errors("register"):
            mr = MR(self.pd, len(data), ibv_access_flags.IBV_ACCESS_LOCAL_WRITE
                    | ibv_access_flags.IBV_ACCESS_REMOTE_READ)
            mr.write(data, len(data))
        return _Region(mr)

    def accept(self, remote: QueuePairInfo | None) -> _QueuePair:
        qp = _QueuePair(self)
        try:
            qp.connect(remote)
        except BaseException:
            qp.close()
            raise
        return qp

    def new_reader(self, conn: Any) -> _Reader:
        return _Reader(self)

"""Durability level ``peers: 1`` with three nodes on 127.0.0.1 (issue 17's done-when tests)."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Any

import pytest

from cistern.cachenode.peers.transport import choose_transport
from support.s3server import list_keys, read_object
from support.wait import wait_until

from .conftest import DEAD_AFTER, PEER_TIMEOUT

HELD_BACK = 3600.0
"""The writer's uploadDelay: its own uploads never start during a test."""


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _checkpoint(root: Path) -> dict[str, bytes]:
    """Shards, then DCP's commit: `.metadata.tmp` fsync'd, renamed to `.metadata`."""
    files = {f"step-1/__{i}_0.distcp": os.urandom(300_000 + i) for i in range(4)}
    for name, data in files.items():
        _write(root / name, data)
    meta = os.urandom(2_000)
    _write(root / "step-1/.metadata.tmp", meta)
    os.rename(root / "step-1/.metadata.tmp", root / "step-1/.metadata")
    return {**files, "step-1/.metadata": meta}


def test_a_killed_writers_checkpoint_reaches_s3_uploaded_by_a_peer(
        cluster: Any, s3: Any, bucket: str) -> None:
    c = cluster(writer={"upload_delay": HELD_BACK}, b={}, c={})
    writer = c.nodes["writer"]
    expected = _checkpoint(writer.mount)
    held = sum(c.nodes[n].status().peers.copies_held_for_peers for n in ("b", "c"))
    assert held == len(expected)
    assert writer.status().peers.copies_missing_total == 0
    writer.kill()  # kill -9 right after the fsyncs: nothing was uploaded by it
    assert list(list_keys(s3, bucket)) == []

    def complete() -> bool:
        return sorted(list_keys(s3, bucket)) == sorted(expected)

    wait_until(complete, timeout=60, what="the peers to upload the dead writer's checkpoint")
    for key, data in expected.items():
        assert read_object(s3, bucket, key) == data, key
    rescued = [c.nodes[n].status().peers for n in ("b", "c")]
    assert sum(p.rescued_uploads_total for p in rescued) == len(expected)
    assert all("writer" in p.dead_peers for p in rescued)
    wait_until(lambda: all(c.nodes[n].status().peers.copies_held_for_peers == 0
                           for n in ("b", "c")), timeout=30, what="copies dropped")
    assert sorted(list_keys(s3, bucket)) == sorted(expected)  # no duplicate or conflict object


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
def test_another_node_reads_a_dcp_checkpoint_not_yet_uploaded(
        cluster: Any, s3: Any, bucket: str) -> None:
    torch = pytest.importorskip("torch", reason="PyTorch is not installed")
    import torch.distributed.checkpoint as dcp

    c = cluster(writer={"upload_delay": HELD_BACK}, b={}, reader={})
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(),
                                torch.nn.Linear(128, 8))
    state = {"model": model.state_dict()}
    path = c.nodes["writer"].mount / "ckpt" / "step-7"
    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(path), thread_count=2))
    assert list(list_keys(s3, bucket)) == []  # nothing in S3: the read must come from peers
    reader = c.nodes["reader"]
    names = sorted(os.listdir(reader.mount / "ckpt" / "step-7"))
    assert names == sorted(os.listdir(path))
    empty = {"model": {k: torch.zeros_like(v) for k, v in model.state_dict().items()}}
    dcp.load(empty, storage_reader=dcp.FileSystemReader(str(reader.mount / "ckpt/step-7")))
    for key, tensor in model.state_dict().items():
        assert torch.equal(empty["model"][key], tensor), key
    assert reader.status().peers.peer_read_bytes_total > 0
    assert list(list_keys(s3, bucket)) == []


def test_a_stopped_peer_does_not_stall_writers_beyond_the_bound(cluster: Any) -> None:
    c = cluster(writer={"upload_delay": HELD_BACK}, b={}, c={})
    writer = c.nodes["writer"]
    _write(writer.mount / "warm", b"x")  # connections to both peers exist now
    stopped = c.nodes["b"]
    assert stopped.proc is not None
    os.killpg(stopped.proc.pid, signal.SIGSTOP)
    try:
        done: list[str] = []

        def writes() -> None:
            for i in range(3):
                _write(writer.mount / f"after-stop-{i}", os.urandom(100_000))
                done.append(f"after-stop-{i}")

        thread = threading.Thread(target=writes, daemon=True)
        thread.start()
        # Without the bound these fsyncs would wait for the stopped peer for ever; with it
        # each waits at most peerTimeout, and after the first one the peer is skipped.
        wait_until(lambda: len(done) == 3, timeout=10 * (PEER_TIMEOUT + DEAD_AFTER),
                   what="fsyncs to return while a peer is stopped")
        status = writer.status().peers
        assert "b" in status.suspects
        assert status.copies_missing_total == 0  # the other peer took the copies
        assert c.nodes["c"].status().peers.copies_held_for_peers >= 3
    finally:
        os.killpg(stopped.proc.pid, signal.SIGCONT)


def test_a_node_joins_without_a_restart_and_status_says_why_tcp(cluster: Any) -> None:
    c = cluster(writer={"upload_delay": HELD_BACK}, b={})
    writer = c.nodes["writer"]
    assert writer.status().peers.members == ("b",)
    late = c.add("late")  # the operator publishes the new member; nobody restarts
    late.start()
    wait_until(lambda: writer.status().peers.members == ("b", "late"), timeout=30,
               what="the writer to see the new member")
    # This machine's own detection (no RDMA device here: TCP, and the missing piece as the
    # reason) in /status and /metrics; the operator copies it into the WriteCache status
    # (tests/integration/operator/test_operator_peers.py).
    expected = choose_transport("auto")
    peers = writer.status().peers
    assert (peers.transport, peers.transport_reason) == (expected.name, expected.reason)
    for label in (f'transport="{expected.name}"', f'reason="{expected.reason}"'):
        assert writer.metric("cistern_peer_transport_info", label) == 1.0, label

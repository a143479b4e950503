"""Streaming uploads: large files leave the node while they are written, never mixed up.

A file being written at a final name starts its multipart upload once it holds a part beyond
the threshold; these tests hold the writer open, wait until the store has parts of it, then
rewrite, truncate or rename it and check that the object is exactly the final content and
that no multipart upload is left behind.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cistern.config import FlushPolicy
from support.frontends import ON_ALL_FRONTENDS
from support.s3server import list_keys, read_object
from support.wait import wait_until

pytestmark = ON_ALL_FRONTENDS

MiB = 2**20
STREAM = {"flush": {"partSize": "5Mi", "multipartThreshold": "5Mi"}}


def _wait(condition: Callable[[], bool], what: str, node: Any, timeout: float = 60.0) -> None:
    try:
        wait_until(condition, timeout=timeout, what=what)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{node.log()}") from None


def _parts_sent(s3: Any, bucket: str, key: str) -> int:
    """Parts the store holds of unfinished multipart uploads of ``key``."""
    total = 0
    for upload in s3.list_multipart_uploads(Bucket=bucket, Prefix=key).get("Uploads", []):
        if upload["Key"] == key:
            total += len(s3.list_parts(Bucket=bucket, Key=key,
                                       UploadId=upload["UploadId"]).get("Parts", []))
    return total


def _no_uploads_left(s3: Any, bucket: str) -> None:
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def _same(body: bytes, expected: bytes) -> None:
    assert len(body) == len(expected)
    assert hashlib.sha256(body).digest() == hashlib.sha256(expected).digest()


def _write_open(path: Path, data: bytes) -> Any:
    f = open(path, "wb")  # noqa: SIM115 - held open across the test on purpose
    f.write(data)
    f.flush()
    return f


def test_first_part_leaves_before_close(make_node: Any, bucket: str, s3: Any,
                                        proxy: Any) -> None:
    node = make_node(bucket, endpoint=proxy.endpoint, config=STREAM)
    first = os.urandom(12 * MiB)
    f = _write_open(node.mount / "big.bin", first)
    try:
        _wait(lambda: _parts_sent(s3, bucket, "big.bin") >= 1, "a part sent while open", node)
        assert proxy.counts().get("CREATE_MPU", 0) == 1
        assert "big.bin" not in list_keys(s3, bucket)
        rest = os.urandom(9 * MiB)
        f.write(rest)
    finally:
        f.close()
    node.flush()
    _same(read_object(s3, bucket, "big.bin"), first + rest)
    _no_uploads_left(s3, bucket)
    counts = proxy.counts()
    assert counts.get("ABORT_MPU", 0) == 0 and counts.get("PUT", 0) == 0


def test_rewritten_behind_the_front(make_node: Any, bucket: str, s3: Any, proxy: Any) -> None:
    node = make_node(bucket, endpoint=proxy.endpoint, config=STREAM)
    data = bytearray(os.urandom(16 * MiB))
    f = _write_open(node.mount / "rw.bin", bytes(data))
    try:
        _wait(lambda: _parts_sent(s3, bucket, "rw.bin") >= 2, "two parts sent", node)
        patch = os.urandom(MiB)
        f.seek(2 * MiB)  # inside part 1, which the store already has
        f.write(patch)
        data[2 * MiB:3 * MiB] = patch
        f.seek(len(data))
        tail = os.urandom(3 * MiB)
        f.write(tail)
        data += tail
    finally:
        f.close()
    node.flush()
    _same(read_object(s3, bucket, "rw.bin"), bytes(data))
    _no_uploads_left(s3, bucket)


def test_truncated_below_the_front(make_node: Any, bucket: str, s3: Any, proxy: Any) -> None:
    node = make_node(bucket, endpoint=proxy.endpoint, config=STREAM)
    f = _write_open(node.mount / "tr.bin", os.urandom(16 * MiB))
    try:
        _wait(lambda: _parts_sent(s3, bucket, "tr.bin") >= 2, "two parts sent", node)
        f.truncate(MiB)
        f.seek(MiB)
        more = os.urandom(2 * MiB)
        f.write(more)
        f.flush()
        with open(node.mount / "tr.bin", "rb") as r:
            final = r.read()
    finally:
        f.close()
    assert len(final) == 3 * MiB
    node.flush()
    _same(read_object(s3, bucket, "tr.bin"), final)
    _no_uploads_left(s3, bucket)


def test_renamed_while_streaming(make_node: Any, bucket: str, s3: Any, proxy: Any) -> None:
    node = make_node(bucket, endpoint=proxy.endpoint, config=STREAM)
    first = os.urandom(16 * MiB)
    f = _write_open(node.mount / "a.bin", first)
    try:
        _wait(lambda: _parts_sent(s3, bucket, "a.bin") >= 2, "two parts sent", node)
        os.rename(node.mount / "a.bin", node.mount / "b.bin")
        rest = os.urandom(4 * MiB)
        f.write(rest)
    finally:
        f.close()
    node.flush()
    assert list_keys(s3, bucket) == {"b.bin": 20 * MiB}
    _same(read_object(s3, bucket, "b.bin"), first + rest)
    _no_uploads_left(s3, bucket)


def test_temporary_names_wait_for_the_rename(make_node: Any, bucket: str, s3: Any,
                                             proxy: Any) -> None:
    node = make_node(bucket, endpoint=proxy.endpoint, config=STREAM)
    (node.mount / "stage.tmp").mkdir()
    held = [_write_open(node.mount / name, os.urandom(12 * MiB))
            for name in ("m.pt.tmp", "x.partial", "stage.tmp/shard.bin", "final.bin")]
    try:
        # Once the file at a final name is streaming, the others have had the same chance.
        _wait(lambda: _parts_sent(s3, bucket, "final.bin") >= 1, "final.bin streaming", node)
        uploads = s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
        assert {u["Key"] for u in uploads} == {"final.bin"}
    finally:
        for f in held:
            f.close()
    os.rename(node.mount / "m.pt.tmp", node.mount / "m.pt")
    node.flush()
    assert set(list_keys(s3, bucket)) == {"m.pt", "x.partial", "stage.tmp/shard.bin",
                                          "final.bin"}
    counts = proxy.counts()
    assert counts.get("COPY", 0) == 0 and counts.get("DELETE", 0) == 0
    _no_uploads_left(s3, bucket)


def test_checkpoint_progress_in_status(make_node: Any, bucket: str, s3: Any,
                                       proxy: Any) -> None:
    node = make_node(bucket, endpoint=proxy.endpoint, config=STREAM)
    (node.mount / "step-1").mkdir()
    data = os.urandom(12 * MiB)
    f = _write_open(node.mount / "step-1" / "shard.bin", data)

    def progress() -> Any:
        return next(c for c in node.status().checkpoints if c.path == "step-1")

    try:
        _wait(lambda: progress().bytes_uploaded >= 5 * MiB, "streamed bytes in /status", node)
        now = progress()
        assert now.bytes_written == 12 * MiB and now.durable_at is None
    finally:
        f.close()
    (node.mount / "step-1" / "commit_success.txt").write_text("ok")
    before = time.time()
    node.flush()
    done = progress()
    assert done.state == "durable"
    assert done.bytes_uploaded == done.bytes_written == 12 * MiB + 2
    assert done.durable_at is not None and before - 60 <= done.durable_at <= time.time()


def test_torch_save_rename_streams_nothing_twice(make_node: Any, bucket: str, s3: Any,
                                                 proxy: Any) -> None:
    torch = pytest.importorskip("torch", reason="PyTorch is not installed")
    # The node's default flush settings (the test harness otherwise shortens uploadDelay).
    node = make_node(bucket, endpoint=proxy.endpoint, upload_delay=FlushPolicy().upload_delay)
    state = {"w": torch.randn(12 * MiB)}  # 48 MiB: above the default multipart threshold
    tmp, final = node.mount / "model.pt.tmp", node.mount / "model.pt"
    torch.save(state, tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)
    node.flush()
    assert list(list_keys(s3, bucket)) == ["model.pt"]
    assert read_object(s3, bucket, "model.pt") == final.read_bytes()
    counts = proxy.counts()
    assert counts.get("COPY", 0) == 0 and counts.get("DELETE", 0) == 0
    assert counts.get("ABORT_MPU", 0) == 0
    _no_uploads_left(s3, bucket)


def test_streams_under_throttling(make_node: Any, bucket: str, s3: Any, proxy: Any) -> None:
    """503 SlowDown on parts: retried through the store client's adaptive rate, never mixed."""
    node = make_node(bucket, endpoint=proxy.endpoint, config=STREAM)
    proxy.set(error_rate=1.0, error_kinds=["PART"])  # every part throttled for now
    first = os.urandom(16 * MiB)
    f = _write_open(node.mount / "slow.bin", first)
    try:
        _wait(lambda: proxy.counts().get("THROTTLED", 0) >= 2, "parts throttled", node)
        proxy.set(error_rate=0.3)
        _wait(lambda: _parts_sent(s3, bucket, "slow.bin") >= 1, "a part sent while open", node)
        rest = os.urandom(6 * MiB)
        f.write(rest)
    finally:
        f.close()
    node.flush()
    _same(read_object(s3, bucket, "slow.bin"), first + rest)
    _no_uploads_left(s3, bucket)


def test_dcp_shards_stream_and_the_marker_comes_last(make_node: Any, bucket: str, s3: Any,
                                                     proxy: Any) -> None:
    torch = pytest.importorskip("torch", reason="PyTorch is not installed")
    import torch.distributed.checkpoint as dcp

    node = make_node(bucket, endpoint=proxy.endpoint, upload_delay=0.5, config=STREAM)
    state = {f"layer{i}": torch.randn(1024, 1024) for i in range(16)}  # 64 MiB
    path = node.mount / "run" / "step-1"
    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(path), thread_count=4))
    node.flush()

    def done() -> list[str]:
        return [e.key.rsplit("/", 1)[-1] for e in proxy.log()
                if e.kind in ("PUT", "COMPLETE_MPU") and e.status == 200]

    # The proxy logs a request after answering it: wait for its record of the marker.
    _wait(lambda: ".metadata" in done(), "the marker in the proxy log", node)
    names = done()
    assert names[-1] == ".metadata", names
    assert sorted(names) == sorted(os.listdir(path))
    for name in os.listdir(path):
        assert read_object(s3, bucket, f"run/step-1/{name}") == (path / name).read_bytes()
    counts = proxy.counts()
    assert counts.get("COPY", 0) == 0 and counts.get("DELETE", 0) == 0
    assert counts.get("CREATE_MPU", 0) >= 1
    _no_uploads_left(s3, bucket)


def test_a_file_extended_first_and_filled_later(make_node: Any, bucket: str, s3: Any,
                                                proxy: Any) -> None:
    """ftruncate to the full size, then fill: holes are not streamed as parts of zeros, and
    whatever was sent early is checked against the final content."""
    node = make_node(bucket, endpoint=proxy.endpoint, config=STREAM)
    data = os.urandom(16 * MiB)
    with open(node.mount / "holes.bin", "wb") as f:
        f.truncate(len(data))
        f.flush()
        for offset in range(len(data) - MiB, -1, -MiB):  # back to front
            f.seek(offset)
            f.write(data[offset:offset + MiB])
            f.flush()
    node.flush()
    _same(read_object(s3, bucket, "holes.bin"), data)
    _no_uploads_left(s3, bucket)

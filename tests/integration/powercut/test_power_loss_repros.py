"""The two power-loss cases of issue 15, each a deterministic crash state.

(a) A CLEAN file is being rewritten with O_TRUNC, not fsync'd, while another file's fsync
    makes the journal durable (and commits ext4's journal, truncation included): the
    truncated local file must never be uploaded over the good object.
(b) A CLEAN file is changed in place and the power goes before anything syncs the journal:
    the local copy must not silently differ from the store.
(c) The power goes while this node's own conditional PUT is landing, after a newer version
    was fsync'd: the journal still holds the ETag the PUT was conditional on, so the
    recovered upload meets a 412 from the node's own object. It must overwrite it (If-Match
    on that object), not take it for another writer's and keep it (the power-cut harness's
    "wrong in S3").
(d) The same with a rename: the copy of a renamed file lands at its new key, a file renamed
    over it is fsync'd (and the rename made durable) before the node hears of the copy; the
    recovered upload of that file meets this cache's own copy.
(e) A file with no object yet is rewritten (O_TRUNC, not fsync'd) while its first upload is
    on the wire; the PUT lands, the power goes before its answer is journaled. The journal
    holds the upload's intent row but no object for the file: recovery must count that
    upload as an object that may exist (the power-cut harness's "content the workload never
    wrote"), not upload the truncated local file over it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from support.powercut.blockdev import CacheDevice, missing_capability
from support.powercut.cut import Cut, live_node, power_cut
from support.s3server import list_keys, read_object
from support.wait import wait_until

_reason = missing_capability()
pytestmark = pytest.mark.skipif(_reason is not None, reason=f"power-cut harness: {_reason}")

CONFIG: dict[str, Any] = {}

_REWRITER = """
import sys
path, half = sys.argv[1], int(sys.argv[2])
data = sys.stdin.buffer.read(2 * half)
with open(path, "wb") as f:
    f.write(data[:half])
    f.flush()
    print("half", flush=True)
    sys.stdin.buffer.read()
    f.write(data[half:])
"""


def _write(path: Path, data: bytes, *, sync: bool) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        if sync:
            os.fsync(f.fileno())


@contextmanager
def _half_rewritten(path: Path, data: bytes) -> Iterator[None]:
    """``path`` opened with O_TRUNC, half of ``data`` written, still open (ext4 only pushes
    the data of a truncated-and-rewritten file at close) for the body; the rest is written
    and the file closed after. The rewriter is a process of its own: a FUSE file open in
    this one would be flushed by the fork of the snapshot's ``cp`` while the node is frozen."""
    rewriter = subprocess.Popen([sys.executable, "-c", _REWRITER, str(path), str(len(data) // 2)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert rewriter.stdin is not None and rewriter.stdout is not None
    try:
        rewriter.stdin.write(data)
        rewriter.stdin.flush()
        assert rewriter.stdout.readline() == b"half\n"
        yield
    finally:
        rewriter.stdin.close()
        rewriter.wait(60)


def _data_file(cache_dir: Path, path: Path) -> Path:
    """The cache's data file behind ``path`` (named by inode number, see docs/dev)."""
    ino = os.stat(path).st_ino
    return cache_dir / "data" / f"{ino % 256:02x}" / str(ino)


def test_o_trunc_rewrite_without_fsync_never_replaces_the_object(
        tmp_path: Path, device: CacheDevice, moto: Any, s3: Any, bucket: str) -> None:
    v1, v2 = os.urandom(1 << 20), os.urandom(1 << 20)
    with live_node(device, tmp_path, bucket, moto.endpoint, 3600.0, CONFIG) as node:
        _write(node.mount / "x", v1, sync=True)
        node.flush()
        assert read_object(s3, bucket, "x") == v1
        # x is being rewritten when another rank's fsync commits the journals, the
        # truncation with them.
        with _half_rewritten(node.mount / "x", v2):
            _write(node.mount / "y", b"another rank's shard", sync=True)
            cut = power_cut(node, device, s3, bucket, "a")
    _recovers_a_written_version(tmp_path, moto, s3, cut, v1, v2)
    assert read_object(s3, cut.bucket, "y") == b"another rank's shard"
    cut.discard(s3)


def _recovers_a_written_version(tmp_path: Path, moto: Any, s3: Any, cut: Cut, *versions: bytes
                                ) -> None:
    """The crash state recovered and flushed: x is one of ``versions`` in the store and
    reads back as the store's."""
    with cut.recovered(tmp_path / "r", moto.endpoint, CONFIG) as again:
        local = (again.mount / "x").read_bytes()
        again.flush()
        log = again.log()
    stored = read_object(s3, cut.bucket, "x")
    assert stored in versions, (f"the store's x went from a written version to "
                                f"{len(stored)} bytes of something else\n{log}")
    assert local == stored, "the recovered x differs from the store's"


def test_in_place_change_without_fsync_is_never_silently_dropped(
        tmp_path: Path, device: CacheDevice, moto: Any, s3: Any, bucket: str) -> None:
    v1 = os.urandom(1 << 20)
    patch = os.urandom(4096)
    v2 = patch + v1[len(patch):]
    with live_node(device, tmp_path, bucket, moto.endpoint, 3600.0, CONFIG) as node:
        _write(node.mount / "x", v1, sync=True)
        node.flush()
        _write(node.mount / "z", b"sync the journal after x became clean", sync=True)
        with open(node.mount / "x", "r+b") as f:  # in place, no fsync
            f.write(patch)
        # The kernel may write a file's pages back at any moment; here it did so for x
        # before the power went (and before anything synced the cache's journal).
        fd = os.open(_data_file(device.mountpoint / "cache", node.mount / "x"), os.O_RDONLY)
        try:
            os.fdatasync(fd)
        finally:
            os.close(fd)
        cut = power_cut(node, device, s3, bucket, "b")
    with cut.recovered(tmp_path / "r", moto.endpoint, CONFIG) as again:
        local = (again.mount / "x").read_bytes()
        again.flush()
        kept = again.metric("cistern_durability_events_total", 'kind="unsynced_kept"')
        log = again.log()
        lost_found = again.cache_dir / "lost+found"
        aside = [p.read_bytes() for p in lost_found.iterdir()] if lost_found.is_dir() \
            else []
    stored = read_object(s3, cut.bucket, "x")
    assert stored in (v1, v2), log
    assert local == stored, "the recovered x silently differs from the store's"
    if stored == v1:
        assert kept == 1 and v2 in aside, \
            f"the in-place change was dropped without a word (kept={kept})\n{log}"
    cut.discard(s3)


def _sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _recovers_without_conflict(tmp_path: Path, moto: Any, s3: Any, cut: Cut, key: str,
                               fsynced: bytes) -> None:
    """The crash state recovered: ``key`` reads back and reaches the store as ``fsynced``,
    with no conflict: the object the node met at the key is this cache's own."""
    with cut.recovered(tmp_path / "r", moto.endpoint, CONFIG) as again:
        assert (again.mount / key).read_bytes() == fsynced
        status = again.flush()
        log = again.log()
    assert read_object(s3, cut.bucket, key) == fsynced, f"the fsync'd {key} is not in the " \
        f"store\n{log}"
    assert not [k for k in list_keys(s3, cut.bucket) if "cistern-conflict" in k], log
    assert status.conflicts_total == 0, log
    cut.discard(s3)


def test_own_upload_that_landed_before_the_cut_is_not_a_conflict(
        tmp_path: Path, device: CacheDevice, moto: Any, s3: Any, bucket: str, proxy: Any
) -> None:
    v1, v2, v3 = (os.urandom(300_000) for _ in range(3))
    with live_node(device, tmp_path, bucket, proxy.endpoint, 0.2, CONFIG) as node:
        _write(node.mount / "x", v1, sync=True)
        node.flush()
        _sync_dir(node.mount)  # x's CLEAN row and its ETag are durable
        # The PUT of v2 (If-Match: v1's ETag) lands, its answer is held on the way back...
        proxy.set(response_delay=15.0)
        _write(node.mount / "x", v2, sync=False)
        wait_until(lambda: read_object(s3, bucket, "x") == v2, timeout=30,
                   what="v2 in the store")
        # ... while v3 is written and fsync'd; the power goes before the node hears.
        _write(node.mount / "x", v3, sync=True)
        cut = power_cut(node, device, s3, bucket, "c")
        proxy.set(response_delay=0.0)
    assert read_object(s3, cut.bucket, "x") == v2
    _recovers_without_conflict(tmp_path, moto, s3, cut, "x", v3)


def test_own_copy_that_landed_before_the_cut_is_not_a_conflict(
        tmp_path: Path, device: CacheDevice, moto: Any, s3: Any, bucket: str, proxy: Any
) -> None:
    v1, v2 = os.urandom(200_000), os.urandom(300_000)
    with live_node(device, tmp_path, bucket, proxy.endpoint, 2.0, CONFIG) as node:
        _write(node.mount / "a", v1, sync=True)
        node.flush()
        _sync_dir(node.mount)
        # The copy a -> b (the rename's move) lands, its answer is held...
        proxy.set(response_delay=10.0)
        os.rename(node.mount / "a", node.mount / "b")
        wait_until(lambda: "b" in list_keys(s3, bucket), timeout=60, what="the copy to b")
        # ... while another file replaces b, fsync'd, the rename made durable.
        _write(node.mount / "tmp", v2, sync=True)
        os.rename(node.mount / "tmp", node.mount / "b")
        _sync_dir(node.mount)
        cut = power_cut(node, device, s3, bucket, "d")
        proxy.set(response_delay=0.0)
    assert read_object(s3, cut.bucket, "b") == v1
    _recovers_without_conflict(tmp_path, moto, s3, cut, "b", v2)


def test_rewrite_during_first_upload_never_replaces_the_landed_object(
        tmp_path: Path, device: CacheDevice, moto: Any, s3: Any, bucket: str, proxy: Any
) -> None:
    v1, v2 = os.urandom(1 << 20), os.urandom(1 << 20)
    with live_node(device, tmp_path, bucket, proxy.endpoint, 0.2, CONFIG) as node:
        # x has no object; its first PUT lands and the answer is held on the way back.
        proxy.set(response_delay=15.0)
        _write(node.mount / "x", v1, sync=True)
        wait_until(lambda: "x" in list_keys(s3, bucket), timeout=30, what="v1 in the store")
        # x is rewritten (O_TRUNC, half written, still open) while the upload is in flight:
        # the open made "DIRTY, not synced" durable, and another rank's fsync commits ext4's
        # journal, the truncation with it (as in (a)).
        with _half_rewritten(node.mount / "x", v2):
            # (Else the node knew of its object at the open: not this case.)
            assert node.status().uploading_files == 1, "x's PUT is no longer in flight"
            _write(node.mount / "y", b"another rank's shard", sync=True)
            cut = power_cut(node, device, s3, bucket, "e")
        proxy.set(response_delay=0.0)
    assert read_object(s3, cut.bucket, "x") == v1
    _recovers_a_written_version(tmp_path, moto, s3, cut, v1, v2)
    cut.discard(s3)

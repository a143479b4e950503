"""The flusher against a real core and a local store that fails on request."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from cistern.cachenode.core import ROOT_INO, CacheCore
from cistern.cachenode.retry import RetryPolicy
from cistern.cachenode.store import PermanentStoreError, TemporaryStoreError
from support.flushnode import POLICY, Node


def test_uploads_dirty_files_and_marks_them_clean(node: Node) -> None:
    node.write("a", b"alpha")
    node.write("b", b"beta")
    assert node.flushed()
    assert node.stored("a") == b"alpha" and node.stored("b") == b"beta"
    assert node.core.dirty_bytes == 0 and node.core.clean_bytes == 9
    assert node.flusher.uploaded_objects_total == 2
    assert node.client.uploaded_bytes_total == 9
    assert node.flusher.last_flush_time is not None


def test_large_files_go_up_in_parts(node: Node) -> None:
    data = os.urandom(100 * 1024)  # 7 parts of 16 KiB
    node.write("big", data)
    assert node.flushed()
    assert node.stored("big") == data
    assert node.store.calls["upload_part"] == 7 and node.store.calls["put_file"] == 0
    assert node.client.uploaded_bytes_total == len(data)


def test_temporary_errors_are_retried_and_recorded(node: Node) -> None:
    node.store.fail("put_file", TemporaryStoreError("slow down", "SlowDown"),
                    TemporaryStoreError("slow down", "SlowDown"))
    node.write("a", b"alpha")
    assert node.flushed()
    assert node.stored("a") == b"alpha"
    assert node.client.errors.total == 2
    assert node.store.calls["put_file"] == 3


def test_a_failed_upload_stays_dirty_and_is_uploaded_again(node: Node) -> None:
    node.store.fail("put_file", PermanentStoreError("denied", "AccessDenied"))
    node.write("a", b"alpha")
    # The first attempt fails for good; the file stays dirty and the next round uploads it.
    assert node.flushed()
    assert node.stored("a") == b"alpha"
    assert node.core.dirty_bytes == 0
    assert node.client.errors.total == 1
    assert node.client.errors.recent[0]["code"] == "AccessDenied"


def test_a_failed_part_aborts_the_multipart_upload_and_retries_the_file(node: Node) -> None:
    node.store.fail("upload_part", PermanentStoreError("denied", "AccessDenied"))
    data = os.urandom(100 * 1024)
    node.write("big", data)
    assert node.flushed()
    assert node.stored("big") == data
    assert node.store.calls["abort_multipart"] >= 1
    assert node.store.list_multipart("big") == []


def test_renames_and_deletes_of_uploaded_files_reach_the_store(node: Node) -> None:
    node.write("a", b"alpha")
    node.write("gone", b"temp")
    assert node.flushed()
    node.core.rename(ROOT_INO, "a", ROOT_INO, "b")
    node.core.unlink(ROOT_INO, "gone")
    assert node.flushed()
    assert node.stored("a") is None and node.stored("gone") is None
    assert node.stored("b") == b"alpha"
    assert node.store.calls["copy"] == 1


def test_interrupted_multipart_uploads_are_aborted_on_start(tmp_path: Path,
                                                            faulty_store: Any) -> None:
    first = Node(tmp_path / "cache", faulty_store)
    first.write("big", os.urandom(100 * 1024))
    # Play the part of a flusher that died after starting a multipart upload.
    (work,) = first.core.collect_work(1, force=True)
    upload_id = faulty_store.create_multipart(work.key, {})
    first.core.set_upload_id(work, upload_id)  # type: ignore[arg-type]
    os.close(work.fd)  # type: ignore[union-attr]
    first.core.journal._db.close()  # a crash: no orderly close  # noqa: SLF001
    second = Node(tmp_path / "cache", faulty_store)
    second.flusher.start()
    try:
        assert second.flushed()
        assert faulty_store.list_multipart("big") == []
        assert second.stored("big") is not None
    finally:
        second.close()


def test_a_cleanup_that_fails_is_kept_and_holds_off_idle(tmp_path: Path,
                                                         faulty_store: Any) -> None:
    first = Node(tmp_path / "cache", faulty_store)
    first.write("big", os.urandom(100 * 1024))
    (work,) = first.core.collect_work(1, force=True)
    os.close(work.fd)  # type: ignore[union-attr]
    first.core.journal._db.close()  # noqa: SLF001
    faulty_store.fail("list_multipart", PermanentStoreError("denied", "AccessDenied"))
    second = Node(tmp_path / "cache", faulty_store)
    second.flusher.start()
    try:
        # The file itself uploads, but the interrupted upload could not be checked: the node
        # does not claim to be idle while it may have left a multipart upload behind.
        with second.core.changed:
            assert second.core.changed.wait_for(lambda: second.core.dirty_bytes == 0, 30.0)
        assert second.stored("big") is not None
        assert not second.flushed(timeout=1.0)
        assert second.client.errors.total == 1
    finally:
        second.close()


def test_stop_returns_while_the_store_keeps_failing(tmp_path: Path, faulty_store: Any) -> None:
    slow = RetryPolicy(base_delay=30.0, max_delay=30.0, deadline=3600.0)
    n = Node(tmp_path / "cache", faulty_store, retry=slow)
    faulty_store.fail("put_file", *(TemporaryStoreError("down", "503") for _ in range(100)))
    n.write("a", b"alpha")
    n.flusher.start()
    n.core.request_flush()
    assert not n.flusher.wait_idle(1.0)
    n.close()  # returns: the retry's back-off is cut short, the file stays dirty
    again = CacheCore(tmp_path / "cache", faulty_store, flush=POLICY)
    try:
        assert again.dirty_bytes == 5
    finally:
        again.close()

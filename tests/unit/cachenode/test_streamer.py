"""Streaming uploads against a real core and flusher and a local store that fails on request:
parts leave while the file is open, and the object is always the final content."""

from __future__ import annotations

import os

from cistern.cachenode.core import ROOT_INO, Handle
from cistern.cachenode.store import PermanentStoreError
from support.flushnode import PART, Node
from support.wait import wait_until


def _open(node: Node, name: str) -> Handle:
    handle, _ = node.core.create(ROOT_INO, name, 0o644, os.O_WRONLY, 0, 0)
    return handle


def _no_uploads_left(node: Node, *keys: str) -> None:
    for key in keys:
        assert node.store.list_multipart(key) == []


def test_parts_leave_while_the_file_is_open(node: Node) -> None:
    handle = _open(node, "big")
    data = os.urandom(6 * PART)
    node.core.write(handle, 0, data)
    wait_until(lambda: node.store.calls["upload_part"] >= 2, what="parts sent while open")
    assert node.stored("big") is None
    more = os.urandom(PART + 100)
    node.core.write(handle, len(data), more)
    node.core.release(handle)
    assert node.flushed()
    assert node.stored("big") == data + more
    assert node.flusher.streamer.streams_completed == 1
    _no_uploads_left(node, "big")


def test_a_rewrite_behind_the_front_is_sent_again(node: Node) -> None:
    handle = _open(node, "rw")
    data = bytearray(os.urandom(8 * PART))
    node.core.write(handle, 0, bytes(data))
    wait_until(lambda: node.store.calls["upload_part"] >= 2, what="parts sent while open")
    sent = node.store.calls["upload_part"]
    patch = os.urandom(100)
    node.core.write(handle, 10, patch)  # inside part 1, already in the store
    data[10:110] = patch
    node.core.release(handle)
    assert node.flushed()
    assert node.stored("rw") == bytes(data)
    # Every part once, plus part 1 again: not a whole second upload.
    assert node.store.calls["upload_part"] <= max(sent, 8) + 1
    _no_uploads_left(node, "rw")


def test_truncation_below_the_front_uploads_again(node: Node) -> None:
    handle = _open(node, "tr")
    node.core.write(handle, 0, os.urandom(8 * PART))
    wait_until(lambda: node.store.calls["upload_part"] >= 2, what="parts sent while open")
    final = os.urandom(PART // 2)
    node.core.setattr(handle.ino, size=0)
    node.core.write(handle, 0, final)
    node.core.release(handle)
    assert node.flushed()
    assert node.stored("tr") == final
    assert node.flusher.streamer.streams_abandoned >= 1
    assert node.store.calls["abort_multipart"] >= 1
    _no_uploads_left(node, "tr")


def test_a_failed_part_aborts_and_the_file_is_uploaded_again(node: Node) -> None:
    node.store.fail("upload_part", PermanentStoreError("denied", "AccessDenied"))
    handle = _open(node, "f")
    data = os.urandom(6 * PART)
    node.core.write(handle, 0, data)
    wait_until(lambda: node.store.calls["abort_multipart"] >= 1, what="the stream aborted")
    node.core.release(handle)
    assert node.flushed()
    assert node.stored("f") == data
    _no_uploads_left(node, "f")


def test_temporary_names_are_not_streamed(node: Node) -> None:
    node.core.mkdir(ROOT_INO, "stage.tmp", 0o755, 0, 0)
    stage = node.core.lookup(ROOT_INO, "stage.tmp").ino
    temp = _open(node, "model.pt.tmp.1")  # model.pt.tmp streams as model.pt (streamTempSuffixes)
    partial = _open(node, "x.partial")
    inner, _ = node.core.create(stage, "shard", 0o644, os.O_WRONLY, 0, 0)
    final = _open(node, "final")
    for handle in (temp, partial, inner, final):
        node.core.write(handle, 0, os.urandom(6 * PART))
    wait_until(lambda: node.store.calls["upload_part"] >= 1, what="final streaming")
    assert node.store.calls["create_multipart"] == 1
    for handle in (temp, partial, inner, final):
        node.core.release(handle)
    assert node.flushed()

"""Objects, listings and multipart staging over a real cache core (local-directory store)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from cistern.cachenode.core import ROOT_INO, CacheCore, UploadWork
from cistern.cachenode.s3api.errors import S3Error
from cistern.cachenode.s3api.listing import decode_token, encode_token, list_page
from cistern.cachenode.s3api.multipart import MIN_PART_SIZE, UploadStaging
from cistern.cachenode.s3api.objects import CacheObjects
from cistern.cachenode.store import LocalDirStore
from cistern.config import FlushPolicy


@pytest.fixture
def core(tmp_path: Path) -> Iterator[CacheCore]:
    c = CacheCore(tmp_path / "cache", LocalDirStore(tmp_path / "objects"),
                  flush=FlushPolicy(upload_delay=0.0))
    yield c
    c.close()


@pytest.fixture
def objects(core: CacheCore, tmp_path: Path) -> CacheObjects:
    return CacheObjects(core, tmp_path / "cache" / "s3api")


def _put(objects: CacheObjects, key: str, data: bytes) -> None:
    writer = objects.begin(key)
    writer.write(data)
    writer.commit(f'"{hashlib.md5(data).hexdigest()}"')


def _read(objects: CacheObjects, key: str) -> bytes:
    handle, attr = objects.open(key)
    try:
        return objects.read(handle, 0, attr.size)
    finally:
        objects.close(handle)


def _upload_all(core: CacheCore) -> list[str]:
    keys = []
    for _ in range(10):
        work = core.collect_work(100, force=True)
        if not work:
            return keys
        for item in work:
            assert isinstance(item, UploadWork), item
            etag = core.store.put_file(item.key, item.fd, item.size, item.metadata)
            os.close(item.fd)
            core.finish_upload(item, etag, None)
            keys.append(item.key)
    raise AssertionError("did not converge")


def test_put_replaces_atomically_and_uploads_once_under_its_key(
        core: CacheCore, objects: CacheObjects) -> None:
    _put(objects, "a/b/c.bin", b"first")
    _put(objects, "a/b/c.bin", b"second version")
    assert _read(objects, "a/b/c.bin") == b"second version"
    assert [name for name, _ in core.readdir(objects.find_dir(["a", "b"]) or 0)] == ["c.bin"]
    assert _upload_all(core) == ["a/b/c.bin"]  # never the temporary name
    assert objects.etag("a/b/c.bin", objects.lookup("a/b/c.bin")) == \
        f'"{hashlib.md5(b"second version").hexdigest()}"'  # type: ignore[arg-type]


def test_a_failed_write_leaves_nothing_and_a_crash_leftover_is_swept(
        core: CacheCore, objects: CacheObjects, tmp_path: Path) -> None:
    writer = objects.begin("x/y")
    writer.write(b"partial")
    writer.abort()
    assert objects.lookup("x/y") is None
    assert [n for n, _ in core.readdir(objects.find_dir(["x"]) or 0)] == []
    crashed = objects.begin("x/z")  # a daemon that dies here: the file stays, as does the marker
    crashed.write(b"never acknowledged")
    core.release(crashed.handle)
    assert [n for n, _ in core.readdir(objects.find_dir(["x"]) or 0)] == [crashed.temp]
    again = CacheObjects(core, tmp_path / "cache" / "s3api")
    assert again.sweep_leftovers() == 1
    assert [n for n, _ in core.readdir(objects.find_dir(["x"]) or 0)] == []
    assert _upload_all(core) == []


def test_keys_that_are_not_paths_are_refused(objects: CacheObjects) -> None:
    for key in ("a//b", "/a", "a/../b", "a/./b", "", "a\0b", "x" * 256, ".cistern-s3.1"):
        with pytest.raises(S3Error) as refused:
            objects.begin(key)
        assert refused.value.code in ("InvalidArgument", "KeyTooLongError"), key
    _put(objects, "file", b"1")
    with pytest.raises(S3Error):
        objects.begin("file/below")  # a file where a directory would have to be


def test_listing_order_prefixes_delimiters_and_pages(objects: CacheObjects) -> None:
    keys = ["a-b", "a.b", "a/b", "a/c/d", "a0", "b/x", "b/y/z", "é"]
    for key in keys:
        _put(objects, key, key.encode())
    every = list_page(objects, prefix="", delimiter="", marker="", max_keys=1000)
    assert [k for k, _ in every.contents] == sorted(keys, key=lambda k: k.encode())
    top = list_page(objects, prefix="", delimiter="/", marker="", max_keys=1000)
    assert [k for k, _ in top.contents] == ["a-b", "a.b", "a0", "é"]
    assert top.prefixes == ["a/", "b/"]
    below = list_page(objects, prefix="a/", delimiter="/", marker="", max_keys=1000)
    assert [k for k, _ in below.contents] == ["a/b"] and below.prefixes == ["a/c/"]
    partial = list_page(objects, prefix="a", delimiter="", marker="", max_keys=1000)
    assert [k for k, _ in partial.contents] == ["a-b", "a.b", "a/b", "a/c/d", "a0"]
    dash = list_page(objects, prefix="", delimiter="-", marker="", max_keys=1000)
    assert dash.prefixes == ["a-"]
    # Pages of 3 with the delimiter: items and prefixes count together, no repeats.
    seen: list[str] = []
    marker = ""
    for _ in range(10):
        page = list_page(objects, prefix="", delimiter="/", marker=marker, max_keys=3)
        seen += [k for k, _ in page.contents] + page.prefixes
        if not page.truncated:
            break
        assert page.last is not None
        marker = decode_token(encode_token(page.last))
    assert sorted(seen) == sorted(["a-b", "a.b", "a0", "é", "a/", "b/"])
    assert len(seen) == len(set(seen))
    assert list_page(objects, prefix="nope/", delimiter="", marker="",
                     max_keys=10).contents == []


def test_multipart_plan_checks_order_etags_and_sizes(tmp_path: Path,
                                                    objects: CacheObjects) -> None:
    staging = UploadStaging(tmp_path / "stage")
    upload = staging.get(staging.create("k"), "k")
    etags = {}
    for number, data in ((1, b"a" * MIN_PART_SIZE), (2, b"b" * 10), (3, b"c")):
        fd, tmp = staging.begin_part(upload, number)
        os.write(fd, data)
        etags[number] = staging.commit_part(upload, number, fd, tmp,
                                            hashlib.md5(data).hexdigest())
    with pytest.raises(S3Error) as order:
        staging.plan(upload, [(2, etags[2]), (1, etags[1])])
    assert order.value.code == "InvalidPartOrder"
    with pytest.raises(S3Error) as small:
        staging.plan(upload, [(1, etags[1]), (2, etags[2]), (3, etags[3])])
    assert small.value.code == "EntityTooSmall"
    with pytest.raises(S3Error) as wrong:
        staging.plan(upload, [(1, etags[2])])
    assert wrong.value.code == "InvalidPart"
    parts, etag = staging.plan(upload, [(1, etags[1]), (3, etags[3])])
    want = hashlib.md5(hashlib.md5(b"a" * MIN_PART_SIZE).digest()
                       + hashlib.md5(b"c").digest()).hexdigest()
    assert etag == f'"{want}-2"'
    writer = objects.begin("assembled")
    for part in parts:
        fd = os.open(part.path, os.O_RDONLY)
        writer.copy_from(fd, part.size)
        os.close(fd)
    writer.commit(etag)
    assert _read(objects, "assembled") == b"a" * MIN_PART_SIZE + b"c"
    staging.remove(upload.upload_id)
    with pytest.raises(S3Error) as gone:
        staging.get(upload.upload_id, "k")
    assert gone.value.code == "NoSuchUpload"
    with pytest.raises(S3Error):
        staging.get("../../etc", "k")


def test_delete_is_idempotent_and_prunes_empty_directories(core: CacheCore,
                                                          objects: CacheObjects) -> None:
    _put(objects, "p/q/r", b"1")
    _put(objects, "p/s", b"2")
    objects.delete("p/q/r")
    objects.delete("p/q/r")
    assert [n for n, _ in core.readdir(ROOT_INO)] == ["p"]
    assert [n for n, _ in core.readdir(objects.find_dir(["p"]) or 0)] == ["s"]
    objects.delete("p/s")
    assert core.readdir(ROOT_INO) == []

"""The ObjectStore contract, run against both implementations (local directory and S3/moto)."""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cistern.cachenode.s3store import CHECKSUM_KEY, S3Store
from cistern.cachenode.store import (
    LocalDirStore,
    ObjectStore,
    PermanentStoreError,
    PreconditionFailed,
    TemporaryStoreError,
)
from cistern.config import StoreConfig
from support.s3server import TEST_CREDENTIALS, free_port


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path, moto: Any,
          monkeypatch: pytest.MonkeyPatch) -> Iterator[ObjectStore]:
    if request.param == "local":
        yield LocalDirStore(tmp_path / "objects")
        return
    for key, value in TEST_CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    bucket = f"c-{uuid.uuid4().hex[:12]}"
    moto.client().create_bucket(Bucket=bucket)
    yield S3Store(StoreConfig(url=f"s3://{bucket}/pre", endpoint_url=moto.endpoint,
                              path_style=True))


def _fd(tmp_path: Path, data: bytes) -> int:
    path = tmp_path / f"src-{uuid.uuid4().hex}"
    path.write_bytes(data)
    return os.open(path, os.O_RDONLY)


def test_put_head_download_delete(store: ObjectStore, tmp_path: Path) -> None:
    store.check()
    data = os.urandom(100_000)
    fd = _fd(tmp_path, data)
    store.put_file("a/b.bin", fd, len(data), {"mode": "0o640", "mtime-ns": "1600000000000000000"})
    info = store.head("a/b.bin")
    assert info.size == len(data) and info.metadata["mode"] == "0o640"
    out = os.open(tmp_path / "out", os.O_RDWR | os.O_CREAT, 0o600)
    assert store.download("a/b.bin", out).size == len(data)
    assert os.pread(out, len(data) + 10, 0) == data
    store.delete("a/b.bin")
    store.delete("a/b.bin")  # idempotent
    with pytest.raises(FileNotFoundError):
        store.head("a/b.bin")


def test_conditional_put_refuses_another_version(store: ObjectStore, tmp_path: Path) -> None:
    """If-Match: an overwrite succeeds only over the version the writer knows."""
    first = store.put_file("c.bin", _fd(tmp_path, b"one"), 3, {})
    second = store.put_file("c.bin", _fd(tmp_path, b"two"), 3, {}, if_match=first)
    assert second and second != first
    with pytest.raises(PreconditionFailed):
        store.put_file("c.bin", _fd(tmp_path, b"six"), 3, {}, if_match=first)
    with pytest.raises(PreconditionFailed):
        store.put_file("c.bin", _fd(tmp_path, b"new"), 3, {}, if_none_match=True)
    out = os.open(tmp_path / "out", os.O_RDWR | os.O_CREAT, 0o600)
    store.download("c.bin", out)
    assert os.pread(out, 10, 0) == b"two"
    assert store.put_file("d.bin", _fd(tmp_path, b"new"), 3, {}, if_none_match=True)


def test_s3_download_is_checked_against_the_stored_md5(moto: Any, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A body that does not match the MD5 stored at upload is refused (retried), not cached."""
    for key, value in TEST_CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    bucket = f"c-{uuid.uuid4().hex[:12]}"
    client = moto.client()
    client.create_bucket(Bucket=bucket)
    store = S3Store(StoreConfig(url=f"s3://{bucket}/", endpoint_url=moto.endpoint,
                                path_style=True))
    store.put_file("good", _fd(tmp_path, b"payload"), 7, {})
    assert client.head_object(Bucket=bucket, Key="good")["Metadata"][CHECKSUM_KEY] == \
        hashlib.md5(b"payload").hexdigest()
    out = os.open(tmp_path / "out", os.O_RDWR | os.O_CREAT, 0o600)
    assert store.download("good", out).size == 7
    client.put_object(Bucket=bucket, Key="bad", Body=b"payloaD",
                      Metadata={CHECKSUM_KEY: hashlib.md5(b"payload").hexdigest()})
    with pytest.raises(TemporaryStoreError) as caught:
        store.download("bad", out)
    assert caught.value.code == "BadDigest"


def test_list_dir_and_list_all(store: ObjectStore, tmp_path: Path) -> None:
    fd = _fd(tmp_path, b"x")
    for key in ("top", "d/one", "d/sub/two"):
        store.put_file(key, fd, 1, {})
    files, dirs = store.list_dir("")
    assert [f.key for f in files] == ["top"] and dirs == ["d/"]
    files, dirs = store.list_dir("d/")
    assert [f.key for f in files] == ["d/one"] and dirs == ["d/sub/"]
    assert sorted(i.key for i in store.list_all("d/")) == ["d/one", "d/sub/two"]


def test_multipart_roundtrip_and_abort(store: ObjectStore, tmp_path: Path) -> None:
    part = 5 * 2**20
    data = os.urandom(2 * part + 123)
    fd = _fd(tmp_path, data)
    upload = store.create_multipart("big", {})
    assert store.list_multipart("big") == [upload]
    parts = [(n + 1, store.upload_part("big", upload, n + 1, fd, n * part,
                                       min(part, len(data) - n * part))) for n in range(3)]
    store.complete_multipart("big", upload, parts)
    assert store.head("big").size == len(data)
    assert store.list_multipart("big") == []
    other = store.create_multipart("gone", {})
    store.abort_multipart("gone", other)
    store.abort_multipart("gone", other)  # idempotent
    assert store.list_multipart("gone") == []


def test_copy_keeps_or_replaces_metadata(store: ObjectStore, tmp_path: Path) -> None:
    fd = _fd(tmp_path, b"payload")
    store.put_file("src", fd, 7, {"mode": "0o600"})
    store.copy("src", "dst")
    assert store.head("dst").size == 7
    store.copy("dst", "dst", {"mode": "0o644"})
    assert store.head("dst").metadata["mode"] == "0o644"
    with pytest.raises(FileNotFoundError):
        store.copy("missing", "x")


def test_keys_cannot_escape(store: ObjectStore, tmp_path: Path) -> None:
    fd = _fd(tmp_path, b"x")
    for bad in ("../etc/passwd", "/abs", "a//b", "a/./b", ""):
        with pytest.raises(ValueError):
            store.put_file(bad, fd, 1, {})


def test_errors_are_classified(moto: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in TEST_CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    missing = S3Store(StoreConfig(url="s3://no-such-bucket-x", endpoint_url=moto.endpoint,
                                  path_style=True))
    with pytest.raises(PermanentStoreError, match="does not exist"):
        missing.check()
    down = S3Store(StoreConfig(url="s3://bkt-down", path_style=True,
                               endpoint_url=f"http://127.0.0.1:{free_port()}"))
    with pytest.raises(TemporaryStoreError):
        down.check()

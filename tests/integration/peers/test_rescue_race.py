"""Two holders of the same copy of a dead node: S3's conditional PUT lets exactly one upload."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest

from cistern.cachenode.peers.client import PeerPool
from cistern.cachenode.peers.copies import CopyStore
from cistern.cachenode.peers.index import PeerIndex
from cistern.cachenode.peers.membership import Membership
from cistern.cachenode.peers.rescue import Rescuer
from cistern.cachenode.s3store import S3Store
from cistern.cachenode.store import ObjectInfo
from cistern.cachenode.storeclient import StoreClient
from cistern.config import StoreConfig
from support.s3server import TEST_CREDENTIALS, list_keys, read_object


class StaleHead:
    """The store as a holder saw it just before the other holder's PUT landed: its first HEAD
    finds nothing (the race the conditional write has to decide). Everything else goes to
    the node's real store client (retries, the multipart calls, ``check_etag``)."""

    def __init__(self, store: S3Store) -> None:
        self.store = store
        self.client = StoreClient(store)
        self.heads = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)

    def head(self, key: str) -> ObjectInfo:
        self.heads += 1
        if self.heads == 1:
            raise FileNotFoundError(key)
        return self.store.head(key)

    def put_file(self, key: str, fd: int, size: int, metadata: dict[str, str],
                 if_match: str | None = None, if_none_match: bool = False) -> str:
        return self.store.put_file(key, fd, size, metadata, if_match=if_match,
                                   if_none_match=if_none_match)


def _holder(root: Path, data: bytes, etag: str | None = None) -> CopyStore:
    copies = CopyStore(root)
    part, fd = copies.begin("dead")
    os.pwrite(fd, data, 0)
    copies.commit(part, fd, origin="dead", key="ckpt/shard", size=len(data), mtime_ns=7,
                  mode=0o644, etag=etag, gen=1, md5=hashlib.md5(data).hexdigest())
    return copies


def _rescuers(tmp_path: Path, moto: Any, bucket: str, monkeypatch: pytest.MonkeyPatch,
              data: bytes, etag: str | None = None, **limits: int) -> list[Rescuer]:
    for key, value in TEST_CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    store = S3Store(StoreConfig(url=f"s3://{bucket}", endpoint_url=moto.endpoint,
                                path_style=True))
    members = tmp_path / "members.json"
    members.write_text(json.dumps({"members": []}))  # the dead node left the list
    return [Rescuer(_holder(tmp_path / name, data, etag), PeerPool(name, b"x" * 16, 5.0),
                    Membership(members, name), StaleHead(store), dead_after=0.0,
                    is_marker=lambda name: False, index=PeerIndex(), **limits)
            for name in ("b", "c")]


def test_two_holders_one_object(tmp_path: Path, moto: Any, bucket: str, s3: Any,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    data = os.urandom(50_000)
    rescuers = _rescuers(tmp_path, moto, bucket, monkeypatch, data)
    for rescuer in rescuers:
        rescuer.check()  # dead at once (deadAfter 0): settle, each with a stale first HEAD
    assert [r.uploaded_total for r in rescuers] == [1, 0]
    assert [r.lost_races_total for r in rescuers] == [0, 1]  # 412, then the same version seen
    assert all(r.copies.rows() == [] for r in rescuers)
    assert list(list_keys(s3, bucket)) == ["ckpt/shard"]
    assert read_object(s3, bucket, "ckpt/shard") == data


MULTIPART = {"single_put_limit": 2**20, "part_size": 5 * 2**20}
"""S3's 5 GiB single-PUT cap, scaled down: above 1 MiB the rescue uploads 5 MiB parts."""


def test_a_copy_above_the_single_put_cap_goes_up_in_parts_once(
        tmp_path: Path, moto: Any, bucket: str, s3: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    data = os.urandom(11 * 2**20 + 3)
    rescuers = _rescuers(tmp_path, moto, bucket, monkeypatch, data, **MULTIPART)
    for rescuer in rescuers:
        rescuer.check()
    # The second holder's Complete carried If-None-Match: * and lost: its upload is aborted,
    # it sees the first one's object (size and mtime-ns: multipart has no cistern-md5).
    assert [r.uploaded_total for r in rescuers] == [1, 0]
    assert [r.lost_races_total for r in rescuers] == [0, 1]
    assert all(r.copies.rows() == [] for r in rescuers)
    assert list(list_keys(s3, bucket)) == ["ckpt/shard"]
    assert read_object(s3, bucket, "ckpt/shard") == data
    assert s3.head_object(Bucket=bucket, Key="ckpt/shard")["ETag"].endswith('-3"')
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def test_a_large_copy_is_not_uploaded_over_another_version(
        tmp_path: Path, moto: Any, bucket: str, s3: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The dead origin knew version A; another writer replaced it with B since: the HEAD
    before Complete (moto ignores If-Match there) refuses, the copy is kept as a conflict."""
    known = s3.put_object(Bucket=bucket, Key="ckpt/shard", Body=b"A")["ETag"].strip('"')
    s3.put_object(Bucket=bucket, Key="ckpt/shard", Body=b"B, another writer's")
    data = os.urandom(6 * 2**20)
    rescuer = _rescuers(tmp_path, moto, bucket, monkeypatch, data, known, **MULTIPART)[0]
    rescuer.check()
    assert rescuer.uploaded_total == 0
    assert rescuer.conflicting == {("dead", "ckpt/shard")}
    assert read_object(s3, bucket, "ckpt/shard") == b"B, another writer's"
    assert len(rescuer.copies.rows()) == 1
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []

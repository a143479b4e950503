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
from cistern.config import StoreConfig
from support.s3server import TEST_CREDENTIALS, list_keys, read_object


class StaleHead:
    """The store as a holder saw it just before the other holder's PUT landed: its first HEAD
    finds nothing (the race the conditional write has to decide)."""

    def __init__(self, store: S3Store) -> None:
        self.store = store
        self.heads = 0

    def head(self, key: str) -> ObjectInfo:
        self.heads += 1
        if self.heads == 1:
            raise FileNotFoundError(key)
        return self.store.head(key)

    def put_file(self, key: str, fd: int, size: int, metadata: dict[str, str],
                 if_match: str | None = None, if_none_match: bool = False) -> str:
        return self.store.put_file(key, fd, size, metadata, if_match=if_match,
                                   if_none_match=if_none_match)


def _holder(root: Path, data: bytes) -> CopyStore:
    copies = CopyStore(root)
    part, fd = copies.begin("dead")
    os.pwrite(fd, data, 0)
    copies.commit(part, fd, origin="dead", key="ckpt/shard", size=len(data), mtime_ns=7,
                  mode=0o644, etag=None, gen=1, md5=hashlib.md5(data).hexdigest())
    return copies


def test_two_holders_one_object(tmp_path: Path, moto: Any, bucket: str, s3: Any,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in TEST_CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    store = S3Store(StoreConfig(url=f"s3://{bucket}", endpoint_url=moto.endpoint,
                                path_style=True))
    members = tmp_path / "members.json"
    members.write_text(json.dumps({"members": []}))  # the dead node left the list
    data = os.urandom(50_000)
    rescuers = []
    for name in ("b", "c"):
        copies = _holder(tmp_path / name, data)
        rescuers.append(Rescuer(copies, PeerPool(name, b"x" * 16, 5.0),
                                Membership(members, name), StaleHead(store), dead_after=0.0,
                                is_marker=lambda name: False, index=PeerIndex()))
    for rescuer in rescuers:
        rescuer.check()  # dead at once (deadAfter 0): settle, each with a stale first HEAD
    assert [r.uploaded_total for r in rescuers] == [1, 0]
    assert [r.lost_races_total for r in rescuers] == [0, 1]  # 412, then the same version seen
    assert all(r.copies.rows() == [] for r in rescuers)
    assert list(list_keys(s3, bucket)) == ["ckpt/shard"]
    assert read_object(s3, bucket, "ckpt/shard") == data

"""Copies on disk, membership reloads, RDMA detection and the durability rules: pure parts."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from cistern.cachenode.peers.copies import CopyStore
from cistern.cachenode.peers.membership import Membership
from cistern.cachenode.peers.transport import choose_transport, detect_rdma
from cistern.config import ConfigError, NodeConfig
from cistern.peerconfig import DurabilityPolicy


def _put(store: CopyStore, key: str, data: bytes, gen: int = 1) -> None:
    part, fd = store.begin("writer")
    os.pwrite(fd, data, 0)
    store.commit(part, fd, origin="writer", key=key, size=len(data), mtime_ns=1, mode=0o644,
                 etag=None, gen=gen, md5=hashlib.md5(data).hexdigest())


def test_copies_survive_a_restart_and_leftovers_are_removed(tmp_path: Path) -> None:
    store = CopyStore(tmp_path)
    _put(store, "c/a", b"one")
    _put(store, "c/a", b"two", gen=2)
    _put(store, "c/a", b"old", gen=1)  # late, older: ignored
    part, fd = store.begin("writer")  # an interrupted transfer
    os.close(fd)
    assert store.rename("writer", "c/", "d/") == 1
    again = CopyStore(tmp_path)
    row = again.get("writer", "d/a")
    assert row is not None and again.data_path(row).read_bytes() == b"two"
    assert again.get("writer", "c/a") is None
    assert not part.exists()
    assert sorted(p.suffix for p in (tmp_path / "writer").iterdir()) == [".data", ".json"]
    assert again.drop("writer", "d/a", upto_gen=1) is False  # a newer copy stays
    assert again.drop("writer", "d/a") is True and again.bytes_held() == 0


def test_a_corrupt_transfer_is_refused(tmp_path: Path) -> None:
    store = CopyStore(tmp_path)
    part, fd = store.begin("writer")
    os.pwrite(fd, b"abc", 0)
    with pytest.raises(ValueError, match="MD5"):
        store.commit(part, fd, origin="writer", key="k", size=3, mtime_ns=1, mode=0,
                     etag=None, gen=1, md5="0" * 32)
    assert store.rows() == [] and not part.exists()


def test_membership_follows_the_file(tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "members.json"
    path.write_text(json.dumps({"members": [{"node": "a", "host": "h", "port": 1},
                                            {"node": "b", "host": "h", "port": 2}]}))
    members = Membership(path, "a")
    assert [m.node for m in members.others()] == ["b"]
    monkeypatch.setattr("cistern.cachenode.peers.membership.CHECK_EVERY", 0.0)
    path.write_text(json.dumps({"members": [{"node": "c", "host": "h", "port": 3}]}))
    assert [m.node for m in members.others()] == ["c"]
    path.write_text("not json")  # a broken update keeps the last good list
    os.utime(path, ns=(1, 1))
    assert [m.node for m in members.others()] == ["c"]


def test_no_rdma_device_falls_back_to_tcp_and_says_why(tmp_path: Path) -> None:
    missing = tmp_path / "infiniband"
    choice = choose_transport("auto", sysfs=missing)
    assert choice.name == "tcp" and "does not exist" in choice.reason
    assert "configured" in choose_transport("tcp").reason
    missing.mkdir()
    assert "is empty" in detect_rdma(missing)[1]
    (missing / "mlx5_0").mkdir()
    devices, reason = detect_rdma(missing, module="cistern_no_such_pyverbs")
    assert devices == ("mlx5_0",) and "pyverbs is not importable" in reason


def test_the_real_machine_reports_a_reason() -> None:
    devices, reason = detect_rdma()
    if devices and not reason:
        pytest.skip("this machine has a usable RDMA device")
    assert reason and choose_transport("rdma").name == "tcp"
    # (that detection without a device loads no pyverbs: test_verbs.py, in a fresh process)


def test_durability_per_path_and_its_requirements() -> None:
    policy = DurabilityPolicy.from_dict({"level": "local", "peers": 2, "paths": [
        {"pattern": "ckpt/*", "level": "peers"}, {"pattern": "*.log", "level": "s3"}]})
    assert policy.for_key("ckpt/step-1/shard") == ("peers", 2)
    assert policy.for_key("x.log") == ("s3", 2)
    assert policy.for_key("other") == ("local", 2)
    with pytest.raises(ConfigError, match="peers.listen"):
        NodeConfig.from_dict({"store": {"url": "s3://ok-bucket"},
                              "durability": {"level": "peers"}})
    with pytest.raises(ConfigError, match=r"paths\[0\].level"):
        DurabilityPolicy.from_dict({"paths": [{"pattern": "x", "level": "disk"}]})

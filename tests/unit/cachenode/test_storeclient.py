"""The store client: every request paced, retried, counted, and its errors recorded."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from cistern.cachenode.metrics import Metrics
from cistern.cachenode.retry import RetryPolicy
from cistern.cachenode.store import PermanentStoreError, TemporaryStoreError
from cistern.cachenode.storeclient import StoreClient
from cistern.config import FlushPolicy

FAST = RetryPolicy(base_delay=0.001, max_delay=0.005, deadline=5.0)


def _sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels or None)
    return value or 0.0


def _object(store: Any, key: str, data: bytes) -> None:
    path = Path(store.root) / key
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_a_fetch_error_is_counted_like_an_upload_error(faulty_store: Any,
                                                       tmp_path: Path) -> None:
    _object(faulty_store, "ckpt/shard0", b"weights")
    client = StoreClient(faulty_store)
    faulty_store.fail("download", TemporaryStoreError("slow down", "SlowDown"))
    fd = os.open(tmp_path / "fetched", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        info = client.download("ckpt/shard0", fd)
        assert os.pread(fd, 100, 0) == b"weights" and info.size == 7
    finally:
        os.close(fd)
    assert client.errors.total == 1
    assert client.errors.recent[0]["op"] == "fetch ckpt/shard0"
    assert client.errors.recent[0]["code"] == "SlowDown"
    assert _sample(client.metrics, "cistern_s3_errors_total", code="SlowDown") == 1
    assert _sample(client.metrics, "cistern_s3_throttles_total") == 1
    assert _sample(client.metrics, "cistern_s3_requests_total", op="get") == 2


def test_listings_are_requests_like_any_other(faulty_store: Any) -> None:
    _object(faulty_store, "d/one", b"1")
    client = StoreClient(faulty_store)
    files, dirs = client.list_dir("d/")
    assert [f.key for f in files] == ["d/one"] and dirs == []
    assert _sample(client.metrics, "cistern_s3_requests_total", op="list") == 1
    faulty_store.fail("list_dir", PermanentStoreError("denied", "AccessDenied"))
    with pytest.raises(PermanentStoreError):
        client.list_dir("d/")
    assert client.errors.total == 1
    assert _sample(client.metrics, "cistern_s3_errors_total", code="AccessDenied") == 1


def test_uploaded_bytes_count_only_what_reached_the_store(faulty_store: Any,
                                                          tmp_path: Path) -> None:
    client = StoreClient(faulty_store, retry=FAST)
    source = tmp_path / "data"
    source.write_bytes(b"x" * 1000)
    fd = os.open(source, os.O_RDONLY)
    try:
        faulty_store.fail("put_file", TemporaryStoreError("blip", "500"))
        client.put_file("k", fd, 1000, {})
    finally:
        os.close(fd)
    assert (Path(faulty_store.root) / "k").read_bytes() == b"x" * 1000
    assert client.uploaded_bytes_total == 1000
    assert _sample(client.metrics, "cistern_uploaded_bytes_total") == 1000
    assert _sample(client.metrics, "cistern_s3_requests_total", op="put") == 2


def test_throttling_cuts_the_shared_request_rate(faulty_store: Any) -> None:
    client = StoreClient(faulty_store, FlushPolicy(max_requests_per_second=1000.0), retry=FAST)
    assert client.request_bucket.rate == 1000.0
    faulty_store.fail("delete", TemporaryStoreError("slow down", "SlowDown"))
    client.delete("anything")
    rate = client.request_bucket.rate
    assert rate is not None and rate < 1000.0
    assert client.adaptive.throttled_now


def test_stop_cuts_retries_short(faulty_store: Any) -> None:
    client = StoreClient(faulty_store, retry=RetryPolicy(base_delay=60.0, max_delay=60.0,
                                                         deadline=3600.0))
    client.stop()
    faulty_store.fail("delete", TemporaryStoreError("slow down", "SlowDown"))
    with pytest.raises(TemporaryStoreError):
        client.delete("anything")
    assert faulty_store.calls["delete"] == 1

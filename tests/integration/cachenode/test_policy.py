"""Flush policy, throttling, backpressure, eviction, retention and drain on a real mount."""

from __future__ import annotations

import errno
import os
import threading
from typing import Any

import pytest

from support.s3server import list_keys, read_object
from support.wait import wait_until


def test_write_through_close_returns_after_the_object_is_durable(make_node: Any, bucket: str,
                                                                 s3: Any) -> None:
    node = make_node(bucket, upload_delay=3600, config={"flush": {"mode": "writeThrough"}})
    data = os.urandom(200_000)
    with open(node.mount / "wt.bin", "wb") as f:
        f.write(data)
    # No flush, one-hour upload delay: only write-through can have put it there.
    assert read_object(s3, bucket, "wt.bin") == data
    status = node.status()
    assert status.mode == "writeThrough"
    wait_until(lambda: node.status().dirty_bytes == 0, what="clean after close")


def test_commit_marker_uploaded_last_with_real_dcp(make_node: Any, bucket: str, s3: Any,
                                                    proxy: Any) -> None:
    torch = pytest.importorskip("torch", reason="PyTorch is not installed")
    import torch.distributed.checkpoint as dcp

    proxy.set(latency=0.035)
    # A short upload delay, as in production: with none, `.metadata.tmp` may be uploaded
    # before DCP renames it, which is still ordered correctly but costs a COPY + DELETE.
    node = make_node(bucket, endpoint=proxy.endpoint, upload_delay=0.5,
                     config={"flush": {"maxConcurrentUploads": 4}})
    state = {f"layer{i}": torch.randn(256, 256) for i in range(16)}
    path = node.mount / "run" / "step-10"
    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(path), thread_count=4,
                                                        single_file_per_rank=False))
    checkpoints = node.status().checkpoints
    assert any(c.path == "run/step-10" for c in checkpoints)
    node.flush()
    puts = [e for e in proxy.log() if e.kind in ("PUT", "COMPLETE_MPU") and e.status == 200
            and "step-10" in e.key]
    names = [e.key.rsplit("/", 1)[-1] for e in puts]
    assert names[-1] == ".metadata", names
    assert len(names) == len(os.listdir(path)) >= 3
    assert [c.state for c in node.status().checkpoints
            if c.path == "run/step-10"] == ["durable"]
    assert proxy.counts().get("COPY", 0) == 0


# The storm is between the flusher and S3; how the files came in (the front end) plays no part.
@pytest.mark.parametrize("frontend", ["pyfuse3"])
def test_throttling_storm_every_file_lands(make_node: Any, bucket: str, s3: Any,
                                           proxy: Any) -> None:
    # Seeded: the proxy draws the same failures in arrival order on every run (never none).
    proxy.set(latency=0.035, error_rate=0.3, seed=1)
    node = make_node(bucket, endpoint=proxy.endpoint, upload_delay=0.0,
                     config={"flush": {"partSize": "5Mi", "multipartThreshold": "6Mi"}})
    files = {f"f{i:02d}": os.urandom(50_000 + i) for i in range(12)}
    files["big"] = os.urandom(12 * 2**20)
    for name, data in files.items():
        (node.mount / name).write_bytes(data)
    node.flush(timeout=300)
    assert list_keys(s3, bucket) == {k: len(v) for k, v in files.items()}
    for name in ("f00", "f11", "big"):
        assert read_object(s3, bucket, name) == files[name]
    assert node.metric("cistern_s3_throttles_total") > 0
    assert node.metric("cistern_s3_errors_total", 'code="SlowDown"') > 0


def test_backpressure_refuses_new_files_when_nothing_can_be_freed(make_node: Any,
                                                                  bucket: str, s3: Any,
                                                                  proxy: Any) -> None:
    node = make_node(bucket, endpoint=proxy.endpoint, upload_delay=0.0,
                     config={"cache": {"capacityBytes": "8Mi", "admissionTimeout": "2s",
                                       "highWatermark": 0.5, "lowWatermark": 0.25}})
    proxy.set(outage=True)
    accepted = {}
    for i in range(3):
        data = os.urandom(3 * 2**20)
        (node.mount / f"ok{i}").write_bytes(data)
        accepted[f"ok{i}"] = data
    held_before = node.metric("cistern_backpressure_seconds_total")
    with pytest.raises(OSError) as info:
        (node.mount / "refused").write_bytes(b"x")
    assert info.value.errno == errno.ENOSPC
    assert node.metric("cistern_admission_refusals_total") == 1
    # Refused only after holding the writer for its whole admissionTimeout (2s), as the
    # daemon accounts it: a refusal at once would add (almost) nothing.
    assert node.metric("cistern_backpressure_seconds_total") - held_before >= 2.0
    # Accepted data is intact locally and reaches the store when it comes back.
    for name, data in accepted.items():
        assert (node.mount / name).read_bytes() == data
    proxy.set(outage=False)
    node.flush(timeout=120)
    for name, data in accepted.items():
        assert read_object(s3, bucket, name) == data
    (node.mount / "after").write_bytes(b"room again")


def test_writer_is_held_then_released_when_the_flusher_frees_space(
        make_node: Any, bucket: str, s3: Any, proxy: Any) -> None:
    node = make_node(bucket, endpoint=proxy.endpoint, upload_delay=0.0,
                     config={"cache": {"capacityBytes": "6Mi", "admissionTimeout": "60s",
                                       "highWatermark": 0.5, "lowWatermark": 0.25}})
    proxy.set(outage=True)
    (node.mount / "a").write_bytes(os.urandom(7 * 2**20))
    done = threading.Event()

    def writer() -> None:
        (node.mount / "b").write_bytes(b"waited")
        done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    wait_until(lambda: "holding a writer" in node.log_path.read_text(errors="replace"),
               what="the writer held at capacity")
    assert not done.is_set(), "the writer should be held while the cache is full"
    proxy.set(outage=False)
    thread.join(60)
    assert done.is_set()
    node.flush()
    assert read_object(s3, bucket, "b") == b"waited"


def test_clean_data_is_evicted_lru_and_fetched_again(make_node: Any, bucket: str,
                                                     s3: Any) -> None:
    node = make_node(bucket, upload_delay=0.0,
                     config={"cache": {"capacityBytes": "10Mi", "highWatermark": 0.6,
                                       "lowWatermark": 0.3}})
    files = {f"e{i}": os.urandom(2 * 2**20) for i in range(5)}
    for name, data in files.items():
        (node.mount / name).write_bytes(data)
    node.flush()
    wait_until(lambda: node.status().clean_bytes <= 3 * 2**20, what="eviction to low watermark")
    assert node.metric("cistern_evictions_total", 'reason="capacity"') >= 2
    assert (node.mount / "e0").read_bytes() == files["e0"]
    assert node.metric("cistern_cache_miss_bytes_total") >= 2 * 2**20


def test_cache_ttl_drops_clean_copies(make_node: Any, bucket: str) -> None:
    node = make_node(bucket, upload_delay=0.0, config={"cache": {"cacheTTL": "1s"}})
    (node.mount / "ttl").write_bytes(b"t" * 1000)
    node.flush()
    wait_until(lambda: node.status().clean_bytes == 0, what="TTL eviction")
    assert (node.mount / "ttl").read_bytes() == b"t" * 1000


def _checkpoints(node: Any, steps: range) -> None:
    for step in steps:
        folder = node.mount / "run" / f"step-{step}"
        folder.mkdir(parents=True)
        (folder / "shard.pt").write_bytes(os.urandom(100_000))
        (folder / ".metadata").write_bytes(b"m")


def test_cache_retention_keeps_the_newest_checkpoints_local(make_node: Any, bucket: str,
                                                            s3: Any) -> None:
    node = make_node(bucket, upload_delay=0.0,
                     config={"cache": {"keepLastCheckpoints": 2, "checkpointPattern": "step-*"}})
    _checkpoints(node, range(8, 12))  # step-8 .. step-11: numeric, not lexical, order
    node.flush()
    wait_until(lambda: node.metric("cistern_retention_deletions_total", 'where="cache"') >= 2,
          what="cache retention")
    assert node.status().clean_bytes == 2 * 100_001
    assert len(list_keys(s3, bucket)) == 8, "cache retention must never delete from S3"
    assert len((node.mount / "run" / "step-8" / "shard.pt").read_bytes()) == 100_000


def test_store_retention_is_opt_in_and_deletes_old_checkpoints(make_node: Any, bucket: str,
                                                               s3: Any) -> None:
    node = make_node(bucket, upload_delay=0.0,
                     config={"store": {"keepLastCheckpoints": 2}})
    _checkpoints(node, range(1, 5))
    node.flush()
    wait_until(lambda: {k.split("/")[1] for k in list_keys(s3, bucket)} == {"step-3", "step-4"},
          what="store retention")
    assert sorted(os.listdir(node.mount / "run")) == ["step-3", "step-4"]


def test_drain_reject_refuses_new_writes_and_reports_progress(make_node: Any, bucket: str,
                                                              s3: Any, proxy: Any) -> None:
    proxy.set(latency=1.0)
    node = make_node(bucket, endpoint=proxy.endpoint, upload_delay=3600,
                     config={"drain": {"newWrites": "reject"}})
    for i in range(4):
        (node.mount / f"d{i}").write_bytes(os.urandom(100_000))
    status = node.drain()
    assert status.state == "draining" and status.drain is not None
    # Each PUT is held 1 s by the proxy: what is left when the drain starts is whole files.
    left = status.drain.bytes_left
    assert left in (100_000, 200_000, 300_000, 400_000), status.drain
    assert (status.drain.new_writes, status.drain.timeout_seconds) == ("reject", 3600.0)
    with pytest.raises(OSError) as info:
        (node.mount / "new").write_bytes(b"x")
    assert info.value.errno == errno.EROFS
    wait_until(lambda: node.status().state == "drained", timeout=60, what="drained")
    done = node.status().drain
    assert done is not None and (done.bytes_left, done.files_left, done.timed_out) == (
        0, 0, False)
    assert len(list_keys(s3, bucket)) == 4
    assert node.metric("cistern_draining") == 1


def test_drain_hold_holds_writers_until_resume(make_node: Any, bucket: str) -> None:
    node = make_node(bucket, upload_delay=0.0, config={"drain": {"newWrites": "hold"}})
    node.drain()
    wait_until(lambda: node.status().state == "drained", what="drained")
    done = threading.Event()
    thread = threading.Thread(target=lambda: ((node.mount / "held").write_text("x"),
                                              done.set()))
    thread.start()
    wait_until(lambda: "holding a writer until the node resumes" in node.log_path.read_text(
        errors="replace"), what="the writer held by the drain")
    assert not done.is_set()
    node._request("POST", "/resume")  # noqa: SLF001
    thread.join(30)
    assert done.is_set() and (node.mount / "held").read_text() == "x"


@pytest.mark.parametrize("flush", [
    {"maxBytesPerSecond": "4Mi"},
    {"maxRequestsPerSecond": 4},
])
def test_rate_limits_pace_uploads(make_node: Any, bucket: str, s3: Any,
                                  flush: dict[str, Any]) -> None:
    node = make_node(bucket, upload_delay=0.0, config={"flush": flush})
    files = {f"r{i}": os.urandom(2**20) for i in range(12)}
    for name, data in files.items():
        (node.mount / name).write_bytes(data)
    node.flush()
    assert list_keys(s3, bucket) == {k: len(v) for k, v in files.items()}
    # The limiter made uploads wait (a counter of the daemon, not a wall-clock assertion).
    assert node.metric("cistern_rate_limited_seconds_total") > 0.5


# The evacuation rate is the flusher's; how the files came in plays no part.
@pytest.mark.parametrize("frontend", ["pyfuse3"])
def test_drain_uses_the_evacuation_rate(make_node: Any, bucket: str, s3: Any) -> None:
    node = make_node(bucket, upload_delay=3600,
                     config={"flush": {"evacuationBytesPerSecond": "4Mi"}})
    for i in range(4):
        (node.mount / f"e{i}").write_bytes(os.urandom(2 * 2**20))
    assert node.metric("cistern_rate_limited_seconds_total") == 0
    node.drain()
    wait_until(lambda: node.status().state == "drained", timeout=60, what="drained")
    assert len(list_keys(s3, bucket)) == 4
    assert node.metric("cistern_rate_limited_seconds_total") > 0.5

"""Read-through: a fresh node over a bucket that already holds objects."""

from __future__ import annotations

import os
import threading
from typing import Any

from support.s3server import list_keys
from support.wait import wait_until


def test_fresh_node_lists_stats_and_reads_existing_objects(make_node: Any, bucket: str,
                                                           s3: Any, proxy: Any) -> None:
    blobs = {"top.txt": b"hello", "ckpt/step-1/a.pt": os.urandom(50_000),
             "ckpt/step-1/.metadata": b"meta", "ckpt/step-2/a.pt": os.urandom(10)}
    for key, body in blobs.items():
        s3.put_object(Bucket=bucket, Key=key, Body=body)
    node = make_node(bucket, endpoint=proxy.endpoint)
    assert sorted(os.listdir(node.mount)) == ["ckpt", "top.txt"]
    assert sorted(os.listdir(node.mount / "ckpt")) == ["step-1", "step-2"]
    assert sorted(os.listdir(node.mount / "ckpt" / "step-1")) == [".metadata", "a.pt"]
    assert (node.mount / "ckpt" / "step-1" / "a.pt").stat().st_size == 50_000
    gets_before = proxy.counts().get("GET", 0)
    assert (node.mount / "ckpt" / "step-1" / "a.pt").read_bytes() == blobs["ckpt/step-1/a.pt"]
    assert proxy.counts().get("GET", 0) == gets_before + 1
    # Cached now: a second read does not go to S3.
    assert (node.mount / "ckpt" / "step-1" / "a.pt").read_bytes() == blobs["ckpt/step-1/a.pt"]
    assert proxy.counts().get("GET", 0) == gets_before + 1
    assert node.metric("cistern_cache_miss_bytes_total") == 50_000


def test_write_into_existing_tree_and_overwrite_remote_file(make_node: Any, bucket: str,
                                                            s3: Any) -> None:
    s3.put_object(Bucket=bucket, Key="d/old.txt", Body=b"old")
    node = make_node(bucket)
    (node.mount / "d" / "old.txt").write_text("new!")
    (node.mount / "d" / "extra").write_text("x")
    node.flush()
    assert list_keys(s3, bucket) == {"d/old.txt": 4, "d/extra": 1}


def test_rename_of_remote_directory_moves_every_object(make_node: Any, bucket: str,
                                                       s3: Any) -> None:
    for key in ("run/a", "run/sub/b", "run/sub/deeper/c"):
        s3.put_object(Bucket=bucket, Key=key, Body=key.encode())
    node = make_node(bucket)
    os.rename(node.mount / "run", node.mount / "run-old")
    assert (node.mount / "run-old" / "sub" / "deeper" / "c").read_text() == "run/sub/deeper/c"
    node.flush()
    assert set(list_keys(s3, bucket)) == {"run-old/a", "run-old/sub/b", "run-old/sub/deeper/c"}


def test_a_throttled_listing_is_retried_not_hidden(make_node: Any, bucket: str, s3: Any,
                                                   proxy: Any) -> None:
    s3.put_object(Bucket=bucket, Key="ckpt/shard-000.bin", Body=b"shard")
    node = make_node(bucket, endpoint=proxy.endpoint)
    proxy.set(error_rate=1.0, error_kinds=["LIST"])
    lookups: list[bool] = []

    def clear_soon() -> None:  # once the lookup below has been throttled
        wait_until(lambda: proxy.counts().get("THROTTLED", 0) >= 1, what="a throttled LIST")
        proxy.set(error_rate=0.0)

    threading.Thread(target=clear_soon).start()
    lookups.append((node.mount / "ckpt" / "shard-000.bin").exists())
    assert lookups == [True], "one throttled LIST must not hide an existing checkpoint"
    assert node.metric("cistern_s3_throttles_total") >= 1

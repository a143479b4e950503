"""Crash recovery: kill -9 at bad moments, restart on the same cache dir, lose nothing."""

from __future__ import annotations

import hashlib
import os
from typing import Any

from support.frontends import ON_ALL_FRONTENDS
from support.s3server import list_keys, read_object
from support.wait import wait_until

pytestmark = ON_ALL_FRONTENDS


def _restart(make_node: Any, bucket: str, old: Any, **kwargs: Any) -> Any:
    return make_node(bucket, cache_dir=old.cache_dir, mount=old.mount, **kwargs)


def test_fsynced_data_survives_kill_9(make_node: Any, bucket: str, s3: Any) -> None:
    node = make_node(bucket, upload_delay=3600)
    data = os.urandom(3 << 20)
    with open(node.mount / "ckpt.pt", "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    (node.mount / "dir").mkdir()
    with open(node.mount / "dir" / "meta.json", "w") as f:
        f.write('{"step": 7}')
        f.flush()
        os.fsync(f.fileno())
    node.kill()
    assert list_keys(s3, bucket) == {}, "nothing should have been uploaded before the crash"

    again = _restart(make_node, bucket, node, upload_delay=0.0)
    assert (again.mount / "ckpt.pt").read_bytes() == data
    assert (again.mount / "dir" / "meta.json").read_text() == '{"step": 7}'
    again.flush()
    assert read_object(s3, bucket, "ckpt.pt") == data
    assert read_object(s3, bucket, "dir/meta.json") == b'{"step": 7}'


def test_kill_9_mid_multipart_upload_of_many_files(make_node: Any, bucket: str, s3: Any,
                                                   proxy: Any) -> None:
    flush = {"partSize": "5Mi", "multipartThreshold": "6Mi", "maxConcurrentUploads": 3}
    node = make_node(bucket, endpoint=proxy.endpoint, upload_delay=0.0,
                     config={"flush": flush})
    proxy.set(latency=0.3)
    files = {f"shards/rank{i}.distcp": os.urandom((11 + i) * 2**20) for i in range(6)}
    (node.mount / "shards").mkdir()
    for name, data in files.items():
        with open(node.mount / name, "wb") as f:
            f.write(data)
            os.fsync(f.fileno())
    wait_until(lambda: proxy.counts().get("PART", 0) >= 2, what="two uploaded parts",
               interval=0.02)
    node.kill()
    in_progress = s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    assert in_progress, "the kill should have interrupted at least one multipart upload"

    proxy.set(latency=0.0)
    again = _restart(make_node, bucket, node, endpoint=proxy.endpoint, upload_delay=0.0,
                     config={"flush": flush})
    again.flush()
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert list_keys(s3, bucket) == {k: len(v) for k, v in files.items()}
    for name, data in files.items():
        assert hashlib.md5(read_object(s3, bucket, name)).digest() == \
            hashlib.md5(data).digest(), name
    (again.mount / "after.txt").write_text("mount works")
    assert (again.mount / "shards" / "rank0.distcp").read_bytes() == files["shards/rank0.distcp"]
    again.flush()
    assert read_object(s3, bucket, "after.txt") == b"mount works"


def test_kill_9_with_pending_rename_and_delete(make_node: Any, bucket: str, s3: Any) -> None:
    node = make_node(bucket, upload_delay=0.0)
    (node.mount / "a").write_bytes(b"A")
    (node.mount / "b").write_bytes(b"B")
    node.flush()
    os.rename(node.mount / "a", node.mount / "a2")
    os.unlink(node.mount / "b")
    node.kill()
    again = _restart(make_node, bucket, node, upload_delay=0.0)
    assert sorted(os.listdir(again.mount)) == ["a2"]
    again.flush()
    assert list_keys(s3, bucket) == {"a2": 1}


def test_truncated_cached_copy_is_fetched_again(make_node: Any, bucket: str, s3: Any) -> None:
    node = make_node(bucket, upload_delay=0.0)
    data = os.urandom(200_000)
    (node.mount / "clean.bin").write_bytes(data)
    node.flush()
    node.stop()
    for path in (node.cache_dir / "data").rglob("*"):
        if path.is_file() and path.stat().st_size == len(data):
            with open(path, "r+b") as f:
                f.truncate(10)
    again = _restart(make_node, bucket, node)
    assert (again.mount / "clean.bin").read_bytes() == data


def test_restart_at_the_dead_mount_of_a_killed_daemon(make_node: Any, bucket: str,
                                                      s3: Any) -> None:
    node = make_node(bucket, upload_delay=3600)
    with open(node.mount / "x", "wb") as f:
        f.write(b"survives")
        os.fsync(f.fileno())
    os.killpg(node.proc.pid, 9)
    node.proc.wait(10)
    # The dead mount is still there: the restart must detach it by itself.
    again = _restart(make_node, bucket, node, upload_delay=0.0)
    assert (again.mount / "x").read_bytes() == b"survives"
    again.flush()
    assert read_object(s3, bucket, "x") == b"survives"


def test_small_files_written_without_fsync_survive_kill_9(make_node: Any, bucket: str,
                                                          s3: Any) -> None:
    """A create is journaled before its reply (the intent log, then SQLite in batches): a
    daemon killed right after a burst of creates finds every file again, whether its row was
    still in the intent log or already applied, and uploads it."""
    node = make_node(bucket, upload_delay=3600)
    (node.mount / "many").mkdir()
    contents = {f"many/f{i:03d}": f"file {i}".encode() for i in range(300)}
    for rel, data in contents.items():
        (node.mount / rel).write_bytes(data)  # no fsync: the page cache survives kill -9
    node.kill()
    again = _restart(make_node, bucket, node, upload_delay=0.0)
    for rel, data in contents.items():
        assert (again.mount / rel).read_bytes() == data, rel
    again.flush()
    keys = list_keys(s3, bucket)
    assert {k: v for k, v in keys.items() if k.startswith("many/")} == \
        {rel: len(data) for rel, data in contents.items()}

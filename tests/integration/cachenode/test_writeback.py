"""Write-back semantics: acknowledge locally, upload later, exactly once, under the final name."""

from __future__ import annotations

import hashlib
import os
import threading
from typing import Any

from support.frontends import ON_ALL_FRONTENDS
from support.s3server import list_keys, read_object
from support.wait import wait_until

pytestmark = ON_ALL_FRONTENDS


def test_close_and_fsync_do_not_wait_for_s3(make_node: Any, bucket: str, s3: Any,
                                            proxy: Any) -> None:
    proxy.set(latency=0.5)
    node = make_node(bucket, endpoint=proxy.endpoint, upload_delay=3600)
    path = node.mount / "fast.bin"
    with open(path, "wb") as f:
        f.write(os.urandom(1 << 20))
        f.flush()
        os.fsync(f.fileno())
    # With a one-hour upload delay nothing can have reached the store when close returns.
    assert "fast.bin" not in list_keys(s3, bucket)
    assert proxy.counts().get("PUT", 0) == 0, "close or fsync waited for a PUT"
    status = node.status()
    assert status.dirty_files == 1 and status.dirty_bytes == 1 << 20
    node.flush()
    assert list_keys(s3, bucket) == {"fast.bin": 1 << 20}
    assert node.status().dirty_bytes == 0


def test_upload_after_delay_without_flush(make_node: Any, bucket: str, s3: Any) -> None:
    node = make_node(bucket, upload_delay=0.5)
    (node.mount / "later.txt").write_text("soon")
    wait_until(lambda: "later.txt" in list_keys(s3, bucket), what="the delayed upload")
    assert read_object(s3, bucket, "later.txt") == b"soon"


def test_multipart_with_bounded_concurrency_and_checksums(make_node: Any, bucket: str,
                                                         s3: Any, proxy: Any) -> None:
    node = make_node(bucket, endpoint=proxy.endpoint,
                     config={"flush": {"partSize": "5Mi", "multipartThreshold": "8Mi",
                                       "maxConcurrentUploads": 2}})
    data = os.urandom(23 * 2**20)
    (node.mount / "big.bin").write_bytes(data)
    node.flush()
    counts = proxy.counts()
    assert counts["CREATE_MPU"] == 1 and counts["COMPLETE_MPU"] == 1
    assert counts["PART"] == 5
    assert counts.get("PUT", 0) == 0
    body = read_object(s3, bucket, "big.bin")
    assert hashlib.sha256(body).digest() == hashlib.sha256(data).digest()
    assert s3.head_object(Bucket=bucket, Key="big.bin")["ETag"].strip('"').endswith("-5")
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def test_read_after_write_is_local(make_node: Any, bucket: str, proxy: Any) -> None:
    node = make_node(bucket, endpoint=proxy.endpoint, upload_delay=3600)
    data = os.urandom(2 << 20)
    (node.mount / "r.bin").write_bytes(data)
    assert (node.mount / "r.bin").read_bytes() == data
    assert proxy.counts().get("GET", 0) == 0


def test_modified_while_uploading_is_uploaded_again(make_node: Any, bucket: str, s3: Any,
                                                    proxy: Any) -> None:
    proxy.set(latency=0.4)
    node = make_node(bucket, endpoint=proxy.endpoint, upload_delay=0.0,
                     config={"flush": {"partSize": "5Mi", "multipartThreshold": "5Mi",
                                       "maxConcurrentUploads": 1}})
    path = node.mount / "moving.bin"
    path.write_bytes(os.urandom(12 * 2**20))
    wait_until(lambda: node.status().uploading_files, timeout=20, what="the upload to start",
               interval=0.02)
    final = os.urandom(7 * 2**20)
    with open(path, "r+b") as f:
        f.truncate(0)
        f.write(final)
    proxy.set(latency=0.0)
    node.flush()
    assert read_object(s3, bucket, "moving.bin") == final
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def test_temp_file_renamed_before_upload_is_uploaded_once(make_node: Any, bucket: str,
                                                          s3: Any, proxy: Any) -> None:
    node = make_node(bucket, endpoint=proxy.endpoint, upload_delay=2.0)
    data = os.urandom(100_000)
    with open(node.mount / "model.pt.tmp", "wb") as f:
        f.write(data)
        os.fsync(f.fileno())
    os.rename(node.mount / "model.pt.tmp", node.mount / "model.pt")
    node.flush()
    counts = proxy.counts()
    assert counts.get("PUT", 0) == 1
    assert counts.get("COPY", 0) == 0 and counts.get("DELETE", 0) == 0
    assert list_keys(s3, bucket) == {"model.pt": 100_000}
    put_keys = [e.key for e in proxy.log() if e.kind == "PUT"]
    assert put_keys == [f"{bucket}/model.pt"] or put_keys == ["model.pt"]


def test_file_created_and_deleted_before_upload_never_reaches_s3(
        make_node: Any, bucket: str, s3: Any, proxy: Any) -> None:
    node = make_node(bucket, endpoint=proxy.endpoint, upload_delay=2.0)
    for i in range(5):
        path = node.mount / f"scratch{i}"
        path.write_bytes(b"x" * 1000)
        path.unlink()
    node.flush()
    assert proxy.counts().get("PUT", 0) == 0
    assert proxy.counts().get("DELETE", 0) == 0
    assert list_keys(s3, bucket) == {}


def test_rename_of_uploaded_file_is_done_by_flusher(make_node: Any, bucket: str, s3: Any,
                                                    proxy: Any) -> None:
    node = make_node(bucket, endpoint=proxy.endpoint, upload_delay=0.0)
    (node.mount / "a").write_bytes(b"payload")
    node.flush()
    # Every S3 request fails from here: a rename that waited for its COPY would fail too.
    proxy.set(outage=True)
    os.rename(node.mount / "a", node.mount / "b")
    assert os.listdir(node.mount) == ["b"] and (node.mount / "b").read_bytes() == b"payload"
    proxy.set(outage=False)
    node.flush()
    done = [(e.kind, e.key) for e in proxy.log()
            if 200 <= e.status < 300 and e.kind in ("PUT", "COPY", "DELETE")]
    assert sorted(done) == [("COPY", "b"), ("DELETE", "a"), ("PUT", "a")]
    assert list_keys(s3, bucket) == {"b": 7}


def test_concurrent_writers_many_files_all_land(make_node: Any, bucket: str, s3: Any) -> None:
    node = make_node(bucket, upload_delay=0.0)
    payloads = {f"w{t}/f{i}": os.urandom(5000 + i) for t in range(4) for i in range(25)}

    def writer(t: int) -> None:
        (node.mount / f"w{t}").mkdir(exist_ok=True)
        for i in range(25):
            (node.mount / f"w{t}/f{i}").write_bytes(payloads[f"w{t}/f{i}"])

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    node.flush()
    assert list_keys(s3, bucket) == {k: len(v) for k, v in payloads.items()}
    for key in ("w0/f0", "w3/f24"):
        assert read_object(s3, bucket, key) == payloads[key]

"""Coherence with the bucket (issue 15): upload integrity that does not rely on the ETag being
the MD5, conditional writes, and conflicts with another writer (boto3) under a running node."""

from __future__ import annotations

import hashlib
import os
from typing import Any

import pytest

from support.frontends import ON_ALL_FRONTENDS
from support.s3server import list_keys, read_object
from support.wait import wait_until

# Every case runs on every front end, except the multipart races that start after close: they
# are between the flusher and S3, and the front end only wrote the file.


@ON_ALL_FRONTENDS
def test_upload_completes_when_etags_are_not_md5(make_node: Any, bucket: str, s3: Any,
                                                 proxy: Any) -> None:
    """SSE-KMS, SSE-C and many S3-compatible stores answer an ETag that is not the body's MD5;
    integrity comes from Content-MD5, so such uploads complete instead of retrying for ever."""
    proxy.set(opaque_etags=True)
    node = make_node(bucket, endpoint=proxy.endpoint)
    data = os.urandom(300_000)
    (node.mount / "kms.bin").write_bytes(data)
    node.flush(timeout=60)
    assert hashlib.sha256(read_object(s3, bucket, "kms.bin")).digest() == \
        hashlib.sha256(data).digest()
    assert proxy.counts().get("PUT", 0) == 1, "the upload was retried"
    put_md5 = [e for e in proxy.log() if e.kind == "PUT"]
    assert put_md5 and put_md5[0].status == 200


@ON_ALL_FRONTENDS
def test_own_overwrite_is_not_a_conflict(make_node: Any, bucket: str, s3: Any) -> None:
    node = make_node(bucket)
    (node.mount / "own.bin").write_bytes(b"v1" * 1000)
    node.flush(timeout=60)
    (node.mount / "own.bin").write_bytes(b"v2" * 1000)
    status = node.flush(timeout=60)
    assert read_object(s3, bucket, "own.bin") == b"v2" * 1000
    assert status.conflicts_total == 0 and status.last_conflict is None
    assert list_keys(s3, bucket) == {"own.bin": 2000}


@ON_ALL_FRONTENDS
def test_another_writers_object_is_never_overwritten(make_node: Any, bucket: str,
                                                     s3: Any) -> None:
    """A second writer replaces an object this node uploaded; the node's next version of the
    file is refused (If-Match), kept as a conflict object, and reported."""
    node = make_node(bucket)
    path = node.mount / "model.bin"
    path.write_bytes(b"ours-1" * 500)
    node.flush(timeout=60)
    theirs = b"theirs" * 700
    s3.put_object(Bucket=bucket, Key="model.bin", Body=theirs)
    ours = os.urandom(50_000)
    path.write_bytes(ours)
    status = node.flush(timeout=60)

    assert read_object(s3, bucket, "model.bin") == theirs, "the other writer's object was lost"
    conflicts = [k for k in list_keys(s3, bucket) if k.startswith("model.bin.cistern-conflict-")]
    assert len(conflicts) == 1, list_keys(s3, bucket)
    assert read_object(s3, bucket, conflicts[0]) == ours
    assert status.conflicts_total == 1
    assert status.last_conflict == f"model.bin -> {conflicts[0]}"
    assert status.last_conflict_time is not None
    assert node.metric("cistern_conflicts_total") == 1
    assert "conflict: another writer replaced model.bin" in node.log()
    # The path gave way to the other writer: the next read fetches their object.
    assert path.read_bytes() == theirs


@ON_ALL_FRONTENDS
def test_changed_object_is_seen_after_revalidate_after(make_node: Any, bucket: str,
                                                        s3: Any) -> None:
    """Another writer changes an object this node holds CLEAN: after ``revalidateAfter`` an
    open checks the ETag and fetches the new version; a DIRTY file is never replaced."""
    node = make_node(bucket, config={"cache": {"revalidateAfter": "1s"}})
    (node.mount / "shared.bin").write_bytes(b"old" * 100)
    (node.mount / "mine.bin").write_bytes(b"mine" * 100)
    node.flush(timeout=60)
    assert (node.mount / "shared.bin").read_bytes() == b"old" * 100
    s3.put_object(Bucket=bucket, Key="shared.bin", Body=b"new" * 200)
    wait_until(lambda: (node.mount / "shared.bin").read_bytes() == b"new" * 200,
               timeout=30, what="the other writer's version through the mount")
    with open(node.mount / "mine.bin", "r+b") as f:  # DIRTY while open for writing
        s3.put_object(Bucket=bucket, Key="mine.bin", Body=b"theirs")
        f.write(b"MINE")
        f.flush()
        reader = (node.mount / "mine.bin").read_bytes()
    assert reader == b"MINE" + b"mine" * 99, "a dirty file was replaced by the store's version"


@ON_ALL_FRONTENDS
def test_new_file_does_not_replace_an_object_created_meanwhile(make_node: Any, bucket: str,
                                                               s3: Any) -> None:
    """The node lists a directory, another writer then creates a key there, and the node
    creates the same name: its first upload is create-only (If-None-Match: *) and conflicts."""
    node = make_node(bucket, upload_delay=3600)
    (node.mount / "d").mkdir()
    assert os.listdir(node.mount / "d") == []
    (node.mount / "d" / "new.bin").write_bytes(b"node")
    s3.put_object(Bucket=bucket, Key="d/new.bin", Body=b"other writer")
    status = node.flush(timeout=60)
    assert read_object(s3, bucket, "d/new.bin") == b"other writer"
    conflicts = [k for k in list_keys(s3, bucket) if k.startswith("d/new.bin.cistern-conflict-")]
    assert len(conflicts) == 1 and read_object(s3, bucket, conflicts[0]) == b"node"
    assert status.conflicts_total == 1
    assert (node.mount / "d" / "new.bin").read_bytes() == b"other writer"


@ON_ALL_FRONTENDS
def test_an_object_holding_this_version_already_is_not_a_conflict(make_node: Any, bucket: str,
                                                                  s3: Any) -> None:
    """While the node held its upload back, someone else put exactly its version at the key
    with its MD5 in the metadata (what a peer rescuing a copy writes, docs/dev/peers.md): the
    node's create-only upload gets 412, finds its own content there, and takes the object as
    its upload: no conflict copy, no second object."""
    node = make_node(bucket, upload_delay=3600)
    (node.mount / "d").mkdir()
    assert os.listdir(node.mount / "d") == []
    data = os.urandom(70_000)
    (node.mount / "d" / "rescued.bin").write_bytes(data)
    s3.put_object(Bucket=bucket, Key="d/rescued.bin", Body=data,
                  Metadata={"cistern-md5": hashlib.md5(data).hexdigest()})
    status = node.flush(timeout=60)
    assert status.conflicts_total == 0 and status.last_conflict is None
    assert list_keys(s3, bucket) == {"d/rescued.bin": len(data)}
    assert read_object(s3, bucket, "d/rescued.bin") == data


@ON_ALL_FRONTENDS
def test_listings_follow_another_writer_and_keep_dirty_files(make_node: Any, bucket: str,
                                                              s3: Any) -> None:
    """A second writer adds, replaces and deletes objects under a running node: after
    ``revalidateAfter`` the directory shows them; a DIRTY file is never dropped, even when
    the other writer deletes or creates its key. After a restart the first look lists again."""
    node = make_node(bucket, upload_delay=3600, config={"cache": {"revalidateAfter": "1s"}})
    d = node.mount / "d"
    d.mkdir()
    (d / "kept.bin").write_bytes(b"kept")
    (d / "gone.bin").write_bytes(b"gone")
    (d / "replaced.bin").write_bytes(b"old")
    (d / "dirty.bin").write_bytes(b"v1")
    node.flush(timeout=60)
    assert (d / "replaced.bin").read_bytes() == b"old"  # a CLEAN local copy
    with open(d / "dirty.bin", "r+b") as dirty:  # DIRTY (open for writing) from here on
        dirty.write(b"v2")
        dirty.flush()
        s3.put_object(Bucket=bucket, Key="d/new.bin", Body=b"theirs")
        s3.put_object(Bucket=bucket, Key="d/sub/deep.bin", Body=b"deep")
        s3.put_object(Bucket=bucket, Key="d/replaced.bin", Body=b"replaced by them")
        s3.delete_object(Bucket=bucket, Key="d/gone.bin")
        s3.delete_object(Bucket=bucket, Key="d/dirty.bin")
        want = ["dirty.bin", "kept.bin", "new.bin", "replaced.bin", "sub"]
        wait_until(lambda: sorted(os.listdir(d)) == want, timeout=30,
                   what=f"the other writer's changes in the listing (now {os.listdir(d)})")
        assert (d / "new.bin").read_bytes() == b"theirs"
        assert (d / "sub" / "deep.bin").read_bytes() == b"deep"
        assert (d / "replaced.bin").read_bytes() == b"replaced by them"
        assert (d / "kept.bin").read_bytes() == b"kept"
        assert (d / "dirty.bin").read_bytes() == b"v2"
    node.flush(timeout=60)
    assert read_object(s3, bucket, "d/dirty.bin") == b"v2", "the dirty file was lost"

    node.stop()
    s3.put_object(Bucket=bucket, Key="d/after.bin", Body=b"while it was down")
    s3.delete_object(Bucket=bucket, Key="d/kept.bin")
    node.start()
    assert sorted(os.listdir(d)) == ["after.bin", "dirty.bin", "new.bin", "replaced.bin",
                                     "sub"]


_MULTIPART = {"flush": {"partSize": "5Mi", "multipartThreshold": "6Mi", "streaming": False}}
_STREAMED = {"flush": {"partSize": "5Mi", "multipartThreshold": "6Mi", "streaming": True}}


def _conflict_copies(s3: Any, bucket: str, key: str) -> list[str]:
    return [k for k in list_keys(s3, bucket) if k.startswith(f"{key}.cistern-conflict-")]


def _race_multipart(node: Any, proxy: Any, s3: Any, bucket: str) -> None:
    """Write a file (a multipart upload, slowed by the proxy); while it is in flight a second
    writer puts its own object at the same key, which must stay, the node's version being
    kept as a conflict copy."""
    ours, theirs = os.urandom(11 << 20), b"put meanwhile"
    proxy.set(latency=1.0)
    started = proxy.counts()["CREATE_MPU"]
    (node.mount / "big.bin").write_bytes(ours)
    wait_until(lambda: proxy.counts()["CREATE_MPU"] > started, timeout=60,
               what="our multipart upload in flight")
    s3.put_object(Bucket=bucket, Key="big.bin", Body=theirs)
    status = node.flush(timeout=120)
    proxy.set(latency=0.0)
    assert read_object(s3, bucket, "big.bin") == theirs, "the other writer's object was lost"
    copies = _conflict_copies(s3, bucket, "big.bin")
    assert len(copies) == 1 and read_object(s3, bucket, copies[0]) == ours
    assert status.conflicts_total == 1
    assert not s3.list_multipart_uploads(Bucket=bucket).get("Uploads")


@pytest.mark.parametrize("frontend", ["pyfuse3"])
def test_multipart_upload_of_a_new_key_never_replaces_an_object_created_meanwhile(
        make_node: Any, bucket: str, s3: Any, proxy: Any) -> None:
    """If-None-Match: * on CompleteMultipartUpload: the other writer's object stays."""
    _race_multipart(make_node(bucket, endpoint=proxy.endpoint, config=_MULTIPART), proxy, s3,
                    bucket)


@ON_ALL_FRONTENDS
def test_streamed_upload_of_a_new_key_never_replaces_an_object_created_meanwhile(
        make_node: Any, bucket: str, s3: Any, proxy: Any) -> None:
    """The same while the file is streamed as it is written (how writes reach the streamer
    depends on the front end): the upload that meets the other writer's object is abandoned
    and uploaded again, conditionally."""
    _race_multipart(make_node(bucket, endpoint=proxy.endpoint, config=_STREAMED), proxy, s3,
                    bucket)


@pytest.mark.parametrize("frontend", ["pyfuse3"])
def test_multipart_overwrite_never_replaces_another_writers_object(
        make_node: Any, bucket: str, s3: Any, proxy: Any) -> None:
    """An overwrite checks the key's ETag just before CompleteMultipartUpload (and sends
    If-Match, which moto ignores): the object another writer put meanwhile stays."""
    node = make_node(bucket, endpoint=proxy.endpoint, config=_MULTIPART)
    (node.mount / "big.bin").write_bytes(os.urandom(7 << 20))
    node.flush(timeout=120)
    _race_multipart(node, proxy, s3, bucket)
    # This node's own multipart object is replaced as usual: no conflict without a writer.
    (node.mount / "own.bin").write_bytes(os.urandom(7 << 20))
    node.flush(timeout=120)
    again = os.urandom(7 << 20)
    (node.mount / "own.bin").write_bytes(again)
    assert node.flush(timeout=120).conflicts_total == 1
    assert read_object(s3, bucket, "own.bin") == again


@ON_ALL_FRONTENDS
def test_corrupted_downloads_are_refused_and_fetched_again(make_node: Any, bucket: str,
                                                           s3: Any, proxy: Any) -> None:
    """Downloads are checked: a single PUT against its stored MD5 (``cistern-md5``), a
    multipart object against its composite CRC-32 (its parts carry ``x-amz-checksum-crc32``);
    a byte flipped on the way is refused and the object fetched again."""
    writer = make_node(bucket, config=_MULTIPART)
    big, small = os.urandom(11 << 20), os.urandom(100_000)
    (writer.mount / "big.bin").write_bytes(big)
    (writer.mount / "small.bin").write_bytes(small)
    writer.flush(timeout=120)
    got = s3.get_object(Bucket=bucket, Key="big.bin", ChecksumMode="ENABLED")
    got["Body"].close()
    assert got["ChecksumCRC32"].endswith("-3"), got
    reader = make_node(bucket, endpoint=proxy.endpoint, name="reader")
    for name, data in (("big.bin", big), ("small.bin", small)):
        gets = proxy.counts()["GET"]
        proxy.set(corrupt_gets=1)
        assert (reader.mount / name).read_bytes() == data
        assert proxy.counts()["GET"] == gets + 2, f"the corrupted {name} was not refused"

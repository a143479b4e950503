"""boto3 against the node's S3 endpoint; objects reach the real bucket under the same keys."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from support.s3server import read_object
from support.wait import wait_until


def _read_or_none(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def _code(exc: pytest.ExceptionInfo[ClientError]) -> str:
    return str(exc.value.response["Error"]["Code"])


def test_put_get_head_delete_and_flush_to_bucket(s3node: Any, s3: Any) -> None:
    c = s3node.client()
    body = os.urandom(300_000)
    put = c.put_object(Bucket=s3node.bucket, Key="ckpt/step-1/model.pt", Body=body)
    assert put["ETag"] == f'"{hashlib.md5(body).hexdigest()}"'
    got = c.get_object(Bucket=s3node.bucket, Key="ckpt/step-1/model.pt")
    assert got["Body"].read() == body
    assert got["ETag"] == put["ETag"]
    head = c.head_object(Bucket=s3node.bucket, Key="ckpt/step-1/model.pt")
    assert head["ContentLength"] == len(body)
    part = c.get_object(Bucket=s3node.bucket, Key="ckpt/step-1/model.pt", Range="bytes=10-19")
    assert part["Body"].read() == body[10:20]
    assert part["ContentRange"] == f"bytes 10-19/{len(body)}"
    tail = c.get_object(Bucket=s3node.bucket, Key="ckpt/step-1/model.pt", Range="bytes=-5")
    assert tail["Body"].read() == body[-5:]
    with pytest.raises(ClientError) as bad_range:
        c.get_object(Bucket=s3node.bucket, Key="ckpt/step-1/model.pt",
                     Range=f"bytes={len(body)}-")
    assert _code(bad_range) == "InvalidRange"
    s3node.node.flush()
    assert read_object(s3, s3node.bucket, "ckpt/step-1/model.pt") == body
    c.delete_object(Bucket=s3node.bucket, Key="ckpt/step-1/model.pt")
    with pytest.raises(ClientError) as missing:
        c.get_object(Bucket=s3node.bucket, Key="ckpt/step-1/model.pt")
    assert _code(missing) == "NoSuchKey"
    with pytest.raises(ClientError) as missing_head:
        c.head_object(Bucket=s3node.bucket, Key="ckpt/step-1/model.pt")
    assert missing_head.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404
    s3node.node.flush()
    assert "Contents" not in s3.list_objects_v2(Bucket=s3node.bucket, Prefix="ckpt/")


def test_multipart_upload_list_parts_and_abort(s3node: Any, s3: Any) -> None:
    from boto3.s3.transfer import TransferConfig

    c = s3node.client()
    b = s3node.bucket
    data = os.urandom(13 * 2**20 + 12345)
    path = s3node.node.workdir / "big.bin"
    path.write_bytes(data)
    config = TransferConfig(multipart_threshold=5 * 2**20, multipart_chunksize=5 * 2**20,
                            max_concurrency=3)
    c.upload_file(str(path), b, "big/one.bin", Config=config)
    head = c.head_object(Bucket=b, Key="big/one.bin")
    assert head["ContentLength"] == len(data)
    assert head["ETag"].endswith('-3"')
    assert c.get_object(Bucket=b, Key="big/one.bin")["Body"].read() == data

    # The low-level calls: ListParts, out-of-order and unknown parts, abort.
    up = c.create_multipart_upload(Bucket=b, Key="big/two.bin")["UploadId"]
    p1 = c.upload_part(Bucket=b, Key="big/two.bin", UploadId=up, PartNumber=1,
                       Body=data[:5 * 2**20])
    p2 = c.upload_part(Bucket=b, Key="big/two.bin", UploadId=up, PartNumber=2, Body=b"tail")
    parts = c.list_parts(Bucket=b, Key="big/two.bin", UploadId=up)["Parts"]
    assert [(p["PartNumber"], p["ETag"], p["Size"]) for p in parts] == \
        [(1, p1["ETag"], 5 * 2**20), (2, p2["ETag"], 4)]
    with pytest.raises(ClientError) as order:
        c.complete_multipart_upload(Bucket=b, Key="big/two.bin", UploadId=up, MultipartUpload={
            "Parts": [{"PartNumber": 2, "ETag": p2["ETag"]}, {"PartNumber": 1,
                                                              "ETag": p1["ETag"]}]})
    assert _code(order) == "InvalidPartOrder"
    with pytest.raises(ClientError) as wrong:
        c.complete_multipart_upload(Bucket=b, Key="big/two.bin", UploadId=up, MultipartUpload={
            "Parts": [{"PartNumber": 1, "ETag": p2["ETag"]}]})
    assert _code(wrong) == "InvalidPart"
    done = c.complete_multipart_upload(Bucket=b, Key="big/two.bin", UploadId=up,
                                       MultipartUpload={"Parts": [
                                           {"PartNumber": 1, "ETag": p1["ETag"]},
                                           {"PartNumber": 2, "ETag": p2["ETag"]}]})
    assert done["ETag"].endswith('-2"')
    assert c.get_object(Bucket=b, Key="big/two.bin")["Body"].read() == data[:5 * 2**20] + b"tail"
    with pytest.raises(ClientError) as gone:
        c.list_parts(Bucket=b, Key="big/two.bin", UploadId=up)
    assert _code(gone) == "NoSuchUpload"

    up3 = c.create_multipart_upload(Bucket=b, Key="big/three.bin")["UploadId"]
    c.upload_part(Bucket=b, Key="big/three.bin", UploadId=up3, PartNumber=1, Body=b"x")
    c.abort_multipart_upload(Bucket=b, Key="big/three.bin", UploadId=up3)
    with pytest.raises(ClientError) as aborted:
        c.upload_part(Bucket=b, Key="big/three.bin", UploadId=up3, PartNumber=2, Body=b"y")
    assert _code(aborted) == "NoSuchUpload"
    # Staged parts are not in the namespace: neither the mount nor a listing shows them.
    assert sorted(os.listdir(s3node.node.mount / "big")) == ["one.bin", "two.bin"]
    s3node.node.flush()
    assert read_object(s3, b, "big/one.bin") == data
    assert read_object(s3, b, "big/two.bin") == data[:5 * 2**20] + b"tail"
    with pytest.raises(ClientError):
        s3.head_object(Bucket=b, Key="big/three.bin")


def test_paginated_listing_with_prefix_and_delimiter(s3node: Any) -> None:
    c = s3node.client()
    b = s3node.bucket
    keys = sorted([f"run/step-{i:03d}/shard-{j}" for i in range(12) for j in range(3)]
                  + ["run/step-000.meta", "run/notes.txt", "top.txt", "run-other/x"])
    for key in keys:
        c.put_object(Bucket=b, Key=key, Body=key.encode())
    paginator = c.get_paginator("list_objects_v2")
    listed = [o["Key"] for page in paginator.paginate(Bucket=b, PaginationConfig={
        "PageSize": 7}) for o in page.get("Contents", [])]
    assert listed == keys
    pages = list(paginator.paginate(Bucket=b, Prefix="run/", Delimiter="/",
                                    PaginationConfig={"PageSize": 5}))
    assert len(pages) > 1
    prefixes = [p["Prefix"] for page in pages for p in page.get("CommonPrefixes", [])]
    files = [o["Key"] for page in pages for o in page.get("Contents", [])]
    assert prefixes == [f"run/step-{i:03d}/" for i in range(12)]
    assert files == ["run/notes.txt", "run/step-000.meta"]
    partial = c.list_objects_v2(Bucket=b, Prefix="run/step-01")
    assert [o["Key"] for o in partial["Contents"]] == [k for k in keys
                                                       if k.startswith("run/step-01")]
    after = c.list_objects_v2(Bucket=b, StartAfter="run/step-011/shard-1")
    assert [o["Key"] for o in after["Contents"]] == [k for k in keys
                                                     if k > "run/step-011/shard-1"]
    v1 = c.list_objects(Bucket=b, Prefix="run-", Delimiter="/")
    assert [p["Prefix"] for p in v1["CommonPrefixes"]] == ["run-other/"]
    odd = "run/space and ünïcode+plus%.txt"
    c.put_object(Bucket=b, Key=odd, Body=b"odd")
    assert odd in [o["Key"] for o in c.list_objects_v2(Bucket=b, Prefix="run/s")["Contents"]]
    assert c.get_object(Bucket=b, Key=odd)["Body"].read() == b"odd"


def test_delete_objects_and_copy(s3node: Any, s3: Any) -> None:
    c = s3node.client()
    b = s3node.bucket
    for i in range(5):
        c.put_object(Bucket=b, Key=f"d/{i}", Body=str(i).encode())
    copied = c.copy_object(Bucket=b, Key="e/copy-of-3", CopySource={"Bucket": b, "Key": "d/3"})
    assert copied["CopyObjectResult"]["ETag"] == c.head_object(Bucket=b, Key="d/3")["ETag"]
    result = c.delete_objects(Bucket=b, Delete={"Objects": [{"Key": f"d/{i}"} for i in
                                                            (0, 1, 3, 9)]})
    assert sorted(d["Key"] for d in result["Deleted"]) == ["d/0", "d/1", "d/3", "d/9"]
    assert [o["Key"] for o in c.list_objects_v2(Bucket=b)["Contents"]] == \
        ["d/2", "d/4", "e/copy-of-3"]
    assert c.get_object(Bucket=b, Key="e/copy-of-3")["Body"].read() == b"3"
    with pytest.raises(ClientError) as missing:
        c.copy_object(Bucket=b, Key="e/x", CopySource={"Bucket": b, "Key": "d/0"})
    assert _code(missing) == "NoSuchKey"
    s3node.node.flush()
    assert sorted(o["Key"] for o in s3.list_objects_v2(Bucket=b)["Contents"]) == \
        ["d/2", "d/4", "e/copy-of-3"]


def test_mount_and_endpoint_see_the_same_files(s3node: Any) -> None:
    c = s3node.client()
    b = s3node.bucket
    mount = s3node.node.mount
    (mount / "from-mount").mkdir()
    (mount / "from-mount" / "a.bin").write_bytes(b"written through FUSE")
    assert c.get_object(Bucket=b, Key="from-mount/a.bin")["Body"].read() == \
        b"written through FUSE"
    c.put_object(Bucket=b, Key="from-s3/deep/b.bin", Body=b"written through S3")
    assert (mount / "from-s3" / "deep" / "b.bin").read_bytes() == b"written through S3"
    c.put_object(Bucket=b, Key="from-mount/a.bin", Body=b"replaced through S3")
    # The kernel may keep its cached entry for the replaced file for its entry TTL (1 s).
    wait_until(lambda: _read_or_none(mount / "from-mount" / "a.bin") == b"replaced through S3",
               timeout=10.0, what="the mount to show the object replaced through S3")
    (mount / "from-s3" / "deep" / "b.bin").unlink()
    with pytest.raises(ClientError) as gone:
        c.head_object(Bucket=b, Key="from-s3/deep/b.bin")
    assert gone.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404
    # No temporary names of the endpoint are left in the namespace.
    assert sorted(os.listdir(mount / "from-mount")) == ["a.bin"]


def test_requests_must_be_signed_with_the_secret(s3node: Any) -> None:
    import urllib.error
    import urllib.request

    bad = s3node.client(secret="not-the-secret")
    with pytest.raises(ClientError) as denied:
        bad.put_object(Bucket=s3node.bucket, Key="x", Body=b"nope")
    assert _code(denied) == "SignatureDoesNotMatch"
    assert denied.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    with pytest.raises(ClientError) as denied_get:
        bad.list_objects_v2(Bucket=s3node.bucket)
    assert _code(denied_get) == "SignatureDoesNotMatch"
    with pytest.raises(urllib.error.HTTPError) as anonymous:
        urllib.request.urlopen(f"{s3node.endpoint}/{s3node.bucket}/x", timeout=10)
    assert anonymous.value.code == 403
    assert b"<Code>AccessDenied</Code>" in anonymous.value.read()
    good = s3node.client()
    with pytest.raises(ClientError) as no_bucket:
        good.list_objects_v2(Bucket="another-bucket")
    assert _code(no_bucket) == "NoSuchBucket"
    good.put_object(Bucket=s3node.bucket, Key="signed", Body=b"ok")
    # boto3 presigns with SigV2 unless told otherwise; the endpoint speaks SigV4 only.
    with pytest.raises(urllib.error.HTTPError) as v2:
        urllib.request.urlopen(good.generate_presigned_url(
            "get_object", Params={"Bucket": s3node.bucket, "Key": "signed"}), timeout=10)
    assert v2.value.code == 403
    good = s3node.client(signature_version="s3v4")
    url = good.generate_presigned_url("get_object", Params={"Bucket": s3node.bucket,
                                                            "Key": "signed"}, ExpiresIn=60)
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.read() == b"ok"
    with pytest.raises(urllib.error.HTTPError) as tampered:
        urllib.request.urlopen(url.replace("signed?", "signed2?"), timeout=10)
    assert b"SignatureDoesNotMatch" in tampered.value.read()


@pytest.mark.parametrize("key", ["a/../b", "a//b", "/lead", "a/./b", ".cistern-s3.x"])
def test_keys_outside_the_namespace_rules_are_refused(s3node: Any, key: str) -> None:
    c = s3node.client()
    with pytest.raises(ClientError) as refused:
        c.put_object(Bucket=s3node.bucket, Key=key, Body=b"x")
    assert _code(refused) == "InvalidArgument"
    assert not (s3node.node.mount / "b").exists()


def test_directory_marker_keys(s3node: Any) -> None:
    c = s3node.client()
    c.put_object(Bucket=s3node.bucket, Key="empty-dir/", Body=b"")
    assert (s3node.node.mount / "empty-dir").is_dir()
    with pytest.raises(ClientError) as with_data:
        c.put_object(Bucket=s3node.bucket, Key="other-dir/", Body=b"data")
    assert _code(with_data) == "InvalidArgument"
    assert not (s3node.node.mount / "other-dir").exists()
    with pytest.raises(ClientError) as not_an_object:
        c.head_object(Bucket=s3node.bucket, Key="empty-dir/")
    assert not_an_object.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404
    listed = c.list_objects_v2(Bucket=s3node.bucket, Delimiter="/")
    assert [p["Prefix"] for p in listed["CommonPrefixes"]] == ["empty-dir/"]


def test_bodies_are_stored_as_sent(s3node: Any) -> None:
    import gzip

    c = s3node.client()
    packed = gzip.compress(b"checkpoint bytes" * 1000)
    c.put_object(Bucket=s3node.bucket, Key="z.gz", Body=packed, ContentEncoding="gzip")
    assert (s3node.node.mount / "z.gz").read_bytes() == packed

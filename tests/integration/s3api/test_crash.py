"""kill -9 around S3 writes: an acknowledged PUT survives and is uploaded; an unacknowledged
one leaves nothing behind, neither in the mount nor in the bucket."""

from __future__ import annotations

import http.client
import os
from typing import Any

from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from support.s3server import list_keys, read_object
from support.wait import wait_until


def test_acknowledged_put_and_staged_parts_survive_kill_9(make_s3node: Any, s3: Any) -> None:
    first = make_s3node(upload_delay=3600)
    c = first.client()
    data = os.urandom(2 << 20)
    c.put_object(Bucket=first.bucket, Key="step-1/model.pt", Body=data)
    up = c.create_multipart_upload(Bucket=first.bucket, Key="step-1/big.pt")["UploadId"]
    part1 = os.urandom(5 << 20)
    p1 = c.upload_part(Bucket=first.bucket, Key="step-1/big.pt", UploadId=up, PartNumber=1,
                       Body=part1)
    first.node.kill()
    assert list_keys(s3, first.bucket) == {}, "nothing was due for upload before the crash"

    again = make_s3node(again=first, upload_delay=0.0)
    c = again.client()
    assert c.get_object(Bucket=again.bucket, Key="step-1/model.pt")["Body"].read() == data
    p2 = c.upload_part(Bucket=again.bucket, Key="step-1/big.pt", UploadId=up, PartNumber=2,
                       Body=b"end")
    c.complete_multipart_upload(Bucket=again.bucket, Key="step-1/big.pt", UploadId=up,
                                MultipartUpload={"Parts": [
                                    {"PartNumber": 1, "ETag": p1["ETag"]},
                                    {"PartNumber": 2, "ETag": p2["ETag"]}]})
    again.node.flush()
    assert read_object(s3, again.bucket, "step-1/model.pt") == data
    assert read_object(s3, again.bucket, "step-1/big.pt") == part1 + b"end"


def _signed_put_headers(s3node: Any, key: str, length: int) -> dict[str, str]:
    host = s3node.endpoint.removeprefix("http://")
    request = AWSRequest(method="PUT", url=f"{s3node.endpoint}/{s3node.bucket}/{key}",
                         headers={"Content-Length": str(length),
                                  "X-Amz-Content-SHA256": "UNSIGNED-PAYLOAD", "Host": host})
    S3SigV4Auth(Credentials(s3node.access_key, s3node.secret_key), "s3",
                "us-east-1").add_auth(request)
    return dict(request.headers.items())


def test_kill_9_in_the_middle_of_a_put_leaves_nothing(make_s3node: Any, s3: Any) -> None:
    first = make_s3node(upload_delay=0.0)
    first.client().put_object(Bucket=first.bucket, Key="ckpt/keep.pt", Body=b"keep")
    first.node.flush()
    host, port = first.endpoint.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    length = 64 << 20
    conn.putrequest("PUT", f"/{first.bucket}/ckpt/half.pt", skip_host=True,
                    skip_accept_encoding=True)
    for name, value in _signed_put_headers(first, "ckpt/half.pt", length).items():
        conn.putheader(name, value)
    conn.endheaders()
    conn.send(os.urandom(8 << 20))
    # The body is arriving into a hidden temporary file of ckpt/ (visible in the mount).
    wait_until(lambda: any(n.startswith(".cistern-s3.")
                           for n in os.listdir(first.node.mount / "ckpt")),
               timeout=30.0, what="the PUT to start writing its temporary file")
    first.node.kill()
    conn.close()

    again = make_s3node(again=first, upload_delay=0.0)
    assert sorted(os.listdir(again.node.mount / "ckpt")) == ["keep.pt"]
    keys = [o["Key"] for o in again.client().list_objects_v2(Bucket=again.bucket)["Contents"]]
    assert keys == ["ckpt/keep.pt"]
    again.node.flush()
    assert sorted(list_keys(s3, again.bucket)) == ["ckpt/keep.pt"]



def test_etags_outlive_a_restart_and_follow_changes(make_s3node: Any) -> None:
    first = make_s3node()
    c = first.client()
    put = c.put_object(Bucket=first.bucket, Key="e/model.pt", Body=b"weights")
    assert c.head_object(Bucket=first.bucket, Key="e/model.pt")["ETag"] == put["ETag"]
    first.node.stop()
    again = make_s3node(again=first)
    c = again.client()
    assert c.head_object(Bucket=again.bucket, Key="e/model.pt")["ETag"] == put["ETag"]
    (again.node.mount / "e" / "model.pt").write_bytes(b"changed through the mount")
    changed = c.head_object(Bucket=again.bucket, Key="e/model.pt")["ETag"]
    assert changed != put["ETag"] and changed.endswith('-1"')

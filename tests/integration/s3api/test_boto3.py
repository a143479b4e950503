"""boto3 against the node's S3 endpoint; objects reach the real bucket under the same keys."""

from __future__ import annotations

import hashlib
import os
from typing import Any

import pytest
from botocore.exceptions import ClientError

from cistern.testing.s3server import read_object


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

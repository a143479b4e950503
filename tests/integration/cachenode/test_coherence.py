"""Coherence with the bucket (issue 15): upload integrity that does not rely on the ETag being
the MD5, conditional writes, and conflicts with another writer (boto3) under a running node."""

from __future__ import annotations

import hashlib
import os
from typing import Any

from support.s3server import read_object


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

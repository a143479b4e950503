"""SigV4 verification and aws-chunked payloads, against AWS's published examples."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import zlib

import pytest

from cistern.cachenode.s3api.errors import S3Error
from cistern.cachenode.s3api.payload import Payload
from cistern.cachenode.s3api.sigv4 import Credential, Verifier

# "Signature Calculations for the Authorization Header: Transferring Payload in Multiple
# Chunks (Chunked Upload)" in the Amazon S3 API reference.
AWS_EXAMPLE = Credential("AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
EXAMPLE_TIME = dt.datetime(2013, 5, 24, 0, 0, 0, tzinfo=dt.UTC)
SEED = "4f232c4386841ef735655705268965c44a0e4690baa4adea153f7db9fa80a0a9"
CHUNK_SIGS = ["ad80c730a21e5b8d04586a2213dd63b9a0e99e0e2307b0ade35a65485a288648",
              "0055627c9e194cb4542bae2aa5492e3c1575bbb81b612b7d234b86a503ef5497",
              "b6c6ea8a5354eaf15b3cb7646744f4275b71ea724fed81ceb9323e279d449df9"]


def _example_headers(signature: str = SEED) -> dict[str, list[str]]:
    return {
        "host": ["s3.amazonaws.com"],
        "x-amz-date": ["20130524T000000Z"],
        "x-amz-storage-class": ["REDUCED_REDUNDANCY"],
        "authorization": [
            "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/"
            "aws4_request,SignedHeaders=content-encoding;content-length;host;"
            "x-amz-content-sha256;x-amz-date;x-amz-decoded-content-length;x-amz-storage-class,"
            f"Signature={signature}"],
        "x-amz-content-sha256": ["STREAMING-AWS4-HMAC-SHA256-PAYLOAD"],
        "content-encoding": ["aws-chunked"],
        "x-amz-decoded-content-length": ["66560"],
        "content-length": ["66824"],
    }


class _Stream:
    def __init__(self, data: bytes) -> None:
        self._data = data

    async def read(self, n: int = -1) -> bytes:
        n = len(self._data) if n < 0 else n
        out, self._data = self._data[:n], self._data[n:]
        return out

    async def readexactly(self, n: int) -> bytes:
        if len(self._data) < n:
            raise asyncio.IncompleteReadError(self._data, n)
        return await self.read(n)

    async def readline(self) -> bytes:
        line, sep, rest = self._data.partition(b"\n")
        self._data = rest
        return line + sep


def _drain(payload: Payload) -> bytes:
    return asyncio.run(payload.read_all())


def _example_body(sigs: list[str]) -> bytes:
    return (f"10000;chunk-signature={sigs[0]}\r\n".encode() + b"a" * 65536 + b"\r\n"
            + f"400;chunk-signature={sigs[1]}\r\n".encode() + b"a" * 1024 + b"\r\n"
            + f"0;chunk-signature={sigs[2]}\r\n\r\n".encode())


def test_streaming_signed_upload_from_the_aws_example() -> None:
    verifier = Verifier(AWS_EXAMPLE)
    headers = _example_headers()
    auth = verifier.verify("PUT", "/examplebucket/chunkObject.txt", [], headers, EXAMPLE_TIME)
    assert auth.signer is not None
    payload = Payload(_Stream(_example_body(CHUNK_SIGS)), headers, auth, 2**20)
    assert _drain(payload) == b"a" * 66560


def test_a_tampered_chunk_is_refused() -> None:
    verifier = Verifier(AWS_EXAMPLE)
    headers = _example_headers()
    auth = verifier.verify("PUT", "/examplebucket/chunkObject.txt", [], headers, EXAMPLE_TIME)
    body = _example_body(CHUNK_SIGS).replace(b"a" * 1024, b"a" * 1023 + b"b")
    with pytest.raises(S3Error) as refused:
        _drain(Payload(_Stream(body), headers, auth, 2**20))
    assert refused.value.code == "SignatureDoesNotMatch"


def test_wrong_seed_signature_time_and_key_are_refused() -> None:
    verifier = Verifier(AWS_EXAMPLE)
    with pytest.raises(S3Error) as bad_sig:
        verifier.verify("PUT", "/examplebucket/chunkObject.txt", [],
                        _example_headers("0" * 64), EXAMPLE_TIME)
    assert bad_sig.value.code == "SignatureDoesNotMatch" and bad_sig.value.status == 403
    with pytest.raises(S3Error) as other_path:
        verifier.verify("PUT", "/examplebucket/other.txt", [], _example_headers(),
                        EXAMPLE_TIME)
    assert other_path.value.code == "SignatureDoesNotMatch"
    with pytest.raises(S3Error) as skewed:
        verifier.verify("PUT", "/examplebucket/chunkObject.txt", [], _example_headers(),
                        EXAMPLE_TIME + dt.timedelta(hours=1))
    assert skewed.value.code == "RequestTimeTooSkewed"
    other = Verifier(Credential("SOMEONEELSE", AWS_EXAMPLE.secret_key))
    with pytest.raises(S3Error) as unknown:
        other.verify("PUT", "/examplebucket/chunkObject.txt", [], _example_headers(),
                     EXAMPLE_TIME)
    assert unknown.value.code == "InvalidAccessKeyId"
    with pytest.raises(S3Error) as anonymous:
        verifier.verify("GET", "/examplebucket/x", [], {"host": ["h"]}, EXAMPLE_TIME)
    assert anonymous.value.code == "AccessDenied"


def test_presigned_get_from_the_aws_example() -> None:
    # "Authenticating Requests: Using Query Parameters" example (GET test.txt, 86400 s).
    query = [("X-Amz-Algorithm", "AWS4-HMAC-SHA256"),
             ("X-Amz-Credential", "AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request"),
             ("X-Amz-Date", "20130524T000000Z"), ("X-Amz-Expires", "86400"),
             ("X-Amz-SignedHeaders", "host"),
             ("X-Amz-Signature",
              "aeeed9bbccd4d02ee5c0109b86d86835f995330da4c265957d157751f604d404")]
    verifier = Verifier(AWS_EXAMPLE)
    headers = {"host": ["examplebucket.s3.amazonaws.com"]}
    verifier.verify("GET", "/test.txt", query, headers, EXAMPLE_TIME + dt.timedelta(hours=1))
    with pytest.raises(S3Error) as expired:
        verifier.verify("GET", "/test.txt", query, headers, EXAMPLE_TIME + dt.timedelta(days=2))
    assert expired.value.code == "AccessDenied"


def _plain_auth(payload: str):  # type: ignore[no-untyped-def]
    from cistern.cachenode.s3api.sigv4 import AuthResult
    return AuthResult(payload=payload, signer=None)


def test_unsigned_trailer_checksum_is_checked() -> None:
    data = b"hello world" * 1000
    crc = base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()
    headers = {"content-encoding": ["aws-chunked"], "x-amz-trailer": ["x-amz-checksum-crc32"],
               "x-amz-decoded-content-length": [str(len(data))]}

    def body(checksum: str) -> bytes:
        return (f"{len(data):x}\r\n".encode() + data + b"\r\n0\r\n"
                + f"x-amz-checksum-crc32:{checksum}\r\n\r\n".encode())

    auth = _plain_auth("STREAMING-UNSIGNED-PAYLOAD-TRAILER")
    assert _drain(Payload(_Stream(body(crc)), headers, auth, 2**20)) == data
    with pytest.raises(S3Error) as bad:
        _drain(Payload(_Stream(body("AAAAAA==")), headers, auth, 2**20))
    assert bad.value.code == "BadDigest"


def test_signed_sha256_content_md5_and_size_limits() -> None:
    data = b"x" * 1000
    good = hashlib.sha256(data).hexdigest()
    headers = {"content-length": ["1000"]}
    assert _drain(Payload(_Stream(data), headers, _plain_auth(good), 2**20)) == data
    with pytest.raises(S3Error) as mismatch:
        _drain(Payload(_Stream(data), headers, _plain_auth("0" * 64), 2**20))
    assert mismatch.value.code == "XAmzContentSHA256Mismatch"
    md5 = {"content-length": ["1000"], "content-md5": [base64.b64encode(b"0" * 16).decode()]}
    with pytest.raises(S3Error) as digest:
        _drain(Payload(_Stream(data), md5, _plain_auth("UNSIGNED-PAYLOAD"), 2**20))
    assert digest.value.code == "BadDigest"
    with pytest.raises(S3Error) as too_big:
        Payload(_Stream(data), headers, _plain_auth("UNSIGNED-PAYLOAD"), 999)
    assert too_big.value.code == "EntityTooLarge"
    with pytest.raises(S3Error) as short:
        _drain(Payload(_Stream(data[:10]), headers, _plain_auth("UNSIGNED-PAYLOAD"), 2**20))
    assert short.value.code == "IncompleteBody"

"""The S3 object store (boto3). Kept apart from store.py so that the cache core, which needs
only the ``ObjectStore`` contract, never imports boto3."""

from __future__ import annotations

import base64
import hashlib
import os
import zlib
from collections.abc import Callable, Iterator
from typing import Any

from cistern.cachenode.store import (
    _COPY_CHUNK,
    CHECKSUM_KEY,
    LocalDirStore,
    ObjectInfo,
    ObjectStore,
    PartChecksum,
    PermanentStoreError,
    PreconditionFailed,
    StoreError,
    TemporaryStoreError,
    hash_range,
    part_receipt,
    receipt_checksum,
    validate_key,
)
from cistern.config import StoreConfig

__all__ = ["CHECKSUM_KEY", "S3Store", "open_store"]


class _Crc32:
    """zlib's CRC-32 with hashlib's interface (S3's ``x-amz-checksum-crc32``, big-endian)."""

    def __init__(self, data: bytes = b"") -> None:
        self._value = zlib.crc32(data)

    def update(self, data: bytes) -> None:
        self._value = zlib.crc32(data, self._value)

    def digest(self) -> bytes:
        return self._value.to_bytes(4, "big")


_COMPOSITE: dict[str, Callable[..., Any]] = {
    "ChecksumCRC32": _Crc32, "ChecksumSHA1": hashlib.sha1, "ChecksumSHA256": hashlib.sha256}
"""S3 checksums whose multipart (COMPOSITE: ``<base64 of the checksum of the parts'
checksums>-<parts>``) form a download can recompute with the standard library."""


def _digests_of(fd: int, offset: int, length: int, *digests: Any) -> None:
    if hash_range(fd, offset, length, *digests) < length:
        raise StoreError(f"local file shrank while reading at offset {offset}", "ShortRead")


def _digest_of(digest: Any, fd: int, offset: int, length: int) -> Any:
    _digests_of(fd, offset, length, digest)
    return digest


def _md5_of(fd: int, offset: int, length: int) -> bytes:
    return _digest_of(hashlib.md5(), fd, offset, length).digest()


_SEND_BLOCK = 2**20
"""The least ``_FdReader.read`` returns: urllib3 asks for 16 KiB at a time, and every block is
one trip through the HTTP stack (and the server's read loop). Measured, 256 MiB in 16 MiB
parts to moto behind the 35 ms proxy: 60 MiB/s with 16 KiB blocks, 70-165 MiB/s with 1 MiB
(docs/benchmarks.md)."""


class _FdReader:
    """A file-like view of ``fd[offset:offset+length]`` for streaming uploads; ``read`` hands
    out at least ``_SEND_BLOCK`` bytes whatever it is asked for (the HTTP client sends what
    it gets)."""

    def __init__(self, fd: int, offset: int, length: int) -> None:
        self._fd, self._start, self._length, self._pos = fd, offset, length, 0

    def read(self, size: int = -1) -> bytes:
        left = self._length - self._pos
        if 0 <= size < _SEND_BLOCK:
            size = _SEND_BLOCK
        if size < 0 or size > left:
            size = left
        if size <= 0:
            return b""
        data = os.pread(self._fd, size, self._start + self._pos)
        self._pos += len(data)
        return data

    def seek(self, pos: int, whence: int = 0) -> int:
        if whence == 0:
            self._pos = pos
        elif whence == 1:
            self._pos += pos
        else:
            self._pos = self._length + pos
        return self._pos

    def tell(self) -> int:
        return self._pos

    def __len__(self) -> int:
        return self._length


_TEMPORARY_CODES = {"SlowDown", "503", "500", "502", "504", "InternalError", "RequestTimeout",
                    "ServiceUnavailable", "Throttling", "ThrottlingException",
                    "RequestLimitExceeded", "RequestTimeTooSkewed", "BadDigest",
                    "IncompleteBody", "XAmzContentSHA256Mismatch", "OperationAborted"}
_PERMANENT_MESSAGES = {
    "NoSuchBucket": "bucket does not exist",
    "AccessDenied": "access denied (check credentials and bucket policy)",
    "InvalidAccessKeyId": "the access key id is not valid (check credentials)",
    "SignatureDoesNotMatch": "the secret key does not match (check credentials)",
    "403": "access denied (check credentials and bucket policy)",
    "404": "not found",
}


class S3Store:
    """S3 (or an S3-compatible server) through boto3; retries are left to the caller's policy."""

    def __init__(self, config: StoreConfig, max_pool: int = 16) -> None:
        import boto3
        from botocore.config import Config

        self.bucket = config.bucket
        self.prefix = config.prefix
        self.description = f"s3://{self.bucket}/{self.prefix}" + (
            f" at {config.endpoint_url}" if config.endpoint_url else "")
        session = boto3.session.Session()
        self._client = session.client(
            "s3",
            endpoint_url=config.endpoint_url,
            region_name=config.region or session.region_name or "us-east-1",
            config=Config(
                # Every body carries one checksum the store verifies (Content-MD5 on PUTs,
                # PartChecksum on parts): botocore's SHA-256 of the payload for SigV4 over
                # plain http would be a second pass over every byte (docs/dev/cachenode.md).
                s3={"addressing_style": "path" if config.path_style else "auto",
                    "payload_signing_enabled": False},
                # total_max_attempts, not max_attempts (which botocore reads as retries):
                # every retry must go through our policy, rate limiter and metrics.
                retries={"total_max_attempts": 1, "mode": "standard"},
                connect_timeout=5,
                read_timeout=60,
                max_pool_connections=max_pool,
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        )
        from botocore import exceptions as botoexc

        self._botoexc = botoexc

    def _k(self, key: str) -> str:
        return self.prefix + validate_key(key)

    def _translate(self, exc: Exception, what: str) -> Exception:
        botoexc = self._botoexc
        if isinstance(exc, botoexc.ClientError):
            error = exc.response.get("Error", {})
            code = str(error.get("Code", "unknown"))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if code in ("NoSuchKey", "404") and what.startswith(("head", "get", "copy")):
                return FileNotFoundError(what)
            if code == "PreconditionFailed" or status == 412 or (
                    code in ("NoSuchKey", "404") and what.startswith(("put", "complete"))):
                # (a PUT with If-Match on a key another writer deleted: NoSuchKey)
                return PreconditionFailed(f"{what}: another writer changed the object")
            if code in _TEMPORARY_CODES or status >= 500 or status == 429:
                return TemporaryStoreError(f"{what}: {code} {error.get('Message', '')}".strip(),
                                           code if code != "unknown" else str(status))
            reason = _PERMANENT_MESSAGES.get(code, error.get("Message") or code)
            return PermanentStoreError(f"{what}: {reason} ({code})", code)
        if isinstance(exc, botoexc.NoCredentialsError | botoexc.PartialCredentialsError):
            return PermanentStoreError(f"{what}: no AWS credentials found (set AWS_ACCESS_KEY_ID"
                                       " and AWS_SECRET_ACCESS_KEY)", "NoCredentials")
        if isinstance(exc, botoexc.EndpointConnectionError | botoexc.ConnectTimeoutError):
            return TemporaryStoreError(f"{what}: cannot reach the endpoint ({exc})",
                                       "EndpointUnreachable")
        if isinstance(exc, botoexc.ReadTimeoutError | botoexc.ConnectionClosedError
                      | botoexc.HTTPClientError | ConnectionError | TimeoutError):
            return TemporaryStoreError(f"{what}: {exc}", "Timeout")
        if isinstance(exc, botoexc.BotoCoreError):
            return TemporaryStoreError(f"{what}: {exc}", type(exc).__name__)
        return exc

    def _call(self, what: str, fn: Any, **kwargs: Any) -> Any:
        try:
            return fn(**kwargs)
        except Exception as exc:
            translated = self._translate(exc, what)
            if translated is exc:
                raise
            raise translated from exc

    def check(self) -> None:
        try:
            self._call(f"bucket {self.bucket}", self._client.head_bucket, Bucket=self.bucket)
        except PermanentStoreError as exc:
            if exc.code in ("404", "NoSuchBucket"):
                raise PermanentStoreError(f"bucket {self.bucket!r} does not exist",
                                          "NoSuchBucket") from exc
            raise

    def put_file(self, key: str, fd: int, size: int, metadata: dict[str, str],
                 if_match: str | None = None, if_none_match: bool = False) -> str:
        md5 = _md5_of(fd, 0, size)
        condition = {"IfMatch": f'"{if_match}"'} if if_match is not None else \
            {"IfNoneMatch": "*"} if if_none_match else {}
        response = self._call(
            f"put {key}", self._client.put_object, Bucket=self.bucket, Key=self._k(key),
            Body=_FdReader(fd, 0, size), ContentLength=size,
            ContentMD5=base64.b64encode(md5).decode(),
            Metadata={**metadata, CHECKSUM_KEY: md5.hex()}, **condition)
        # Integrity is Content-MD5, checked by the store (BadDigest, retried); the ETag is
        # not compared to the MD5: with SSE-KMS, SSE-C and many S3-compatible stores it is
        # not one, and comparing would retry such an upload for ever.
        return str(response.get("ETag", "")).strip('"')

    def create_multipart(self, key: str, metadata: dict[str, str]) -> str:
        # Parts carry CRC-32 checksums, so the object has a composite checksum that every
        # download recomputes (``_check_composite``): multipart objects have no cistern-md5.
        response = self._call(f"create-multipart {key}", self._client.create_multipart_upload,
                              Bucket=self.bucket, Key=self._k(key), Metadata=metadata,
                              ChecksumAlgorithm="CRC32")
        return str(response["UploadId"])

    def upload_part(self, key: str, upload_id: str, number: int, fd: int, offset: int,
                    length: int) -> str:
        checksum = _digest_of(PartChecksum(), fd, offset, length)
        response = self._call(
            f"upload-part {key}#{number}", self._client.upload_part, Bucket=self.bucket,
            Key=self._k(key), UploadId=upload_id, PartNumber=number,
            Body=_FdReader(fd, offset, length), ContentLength=length,
            ChecksumCRC32=checksum.value())
        return part_receipt(str(response["ETag"]), checksum)

    def complete_multipart(self, key: str, upload_id: str, parts: list[tuple[int, str]],
                           if_match: str | None = None, if_none_match: bool = False) -> str:
        condition = {"IfMatch": f'"{if_match}"'} if if_match is not None else \
            {"IfNoneMatch": "*"} if if_none_match else {}
        response = self._call(
            f"complete-multipart {key}", self._client.complete_multipart_upload,
            Bucket=self.bucket, Key=self._k(key), UploadId=upload_id,
            MultipartUpload={"Parts": [
                {"PartNumber": n, "ETag": r.split(" ", 1)[0], "ChecksumCRC32": receipt_checksum(r)}
                for n, r in sorted(parts)]}, **condition)
        return str(response.get("ETag", "")).strip('"')

    def abort_multipart(self, key: str, upload_id: str) -> None:
        try:
            self._call(f"abort-multipart {key}", self._client.abort_multipart_upload,
                       Bucket=self.bucket, Key=self._k(key), UploadId=upload_id)
        except PermanentStoreError as exc:
            if exc.code not in ("NoSuchUpload", "404"):
                raise

    def list_multipart(self, key: str) -> list[str]:
        full = self._k(key)
        response = self._call(f"list-multipart {key}", self._client.list_multipart_uploads,
                              Bucket=self.bucket, Prefix=full)
        return [u["UploadId"] for u in response.get("Uploads", []) if u["Key"] == full]

    def copy(self, src: str, dst: str, metadata: dict[str, str] | None = None) -> None:
        extra: dict[str, Any] = {}
        if metadata is not None:
            extra = {"Metadata": metadata, "MetadataDirective": "REPLACE"}
        from boto3.s3.transfer import TransferConfig

        self._call(f"copy {src} -> {dst}", self._client.copy,
                   CopySource={"Bucket": self.bucket, "Key": self._k(src)},
                   Bucket=self.bucket, Key=self._k(dst), ExtraArgs=extra,
                   Config=TransferConfig(multipart_threshold=5 * 2**30, use_threads=False))

    def delete(self, key: str) -> None:
        self._call(f"delete {key}", self._client.delete_object, Bucket=self.bucket,
                   Key=self._k(key))

    def head(self, key: str) -> ObjectInfo:
        response = self._call(f"head {key}", self._client.head_object, Bucket=self.bucket,
                              Key=self._k(key))
        return ObjectInfo(key=key, size=int(response["ContentLength"]),
                          mtime=response["LastModified"].timestamp(),
                          etag=str(response.get("ETag", "")).strip('"'),
                          metadata=dict(response.get("Metadata", {})))

    def _list(self, prefix: str, delimiter: str | None) -> Iterator[dict[str, Any]]:
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self.prefix + prefix}
        if delimiter:
            kwargs["Delimiter"] = delimiter
        while True:
            page = self._call(f"list {prefix or '/'}", self._client.list_objects_v2, **kwargs)
            yield page
            if not page.get("IsTruncated"):
                return
            kwargs["ContinuationToken"] = page["NextContinuationToken"]

    def _object(self, item: dict[str, Any]) -> ObjectInfo | None:
        key = item["Key"][len(self.prefix):]
        if not key or key.endswith("/"):
            return None
        return ObjectInfo(key=key, size=int(item["Size"]),
                          mtime=item["LastModified"].timestamp(),
                          etag=str(item.get("ETag", "")).strip('"'))

    def list_dir(self, prefix: str) -> tuple[list[ObjectInfo], list[str]]:
        files: list[ObjectInfo] = []
        dirs: list[str] = []
        for page in self._list(prefix, "/"):
            files.extend(info for item in page.get("Contents", [])
                         if (info := self._object(item)) is not None)
            dirs.extend(p["Prefix"][len(self.prefix):] for p in page.get("CommonPrefixes", []))
        return files, dirs

    def list_all(self, prefix: str) -> Iterator[ObjectInfo]:
        for page in self._list(prefix, None):
            for item in page.get("Contents", []):
                info = self._object(item)
                if info is not None:
                    yield info

    def download(self, key: str, fd: int) -> ObjectInfo:
        response = self._call(f"get {key}", self._client.get_object, Bucket=self.bucket,
                              Key=self._k(key), ChecksumMode="ENABLED")
        body = response["Body"]
        offset = 0
        digest = hashlib.md5()
        try:
            while chunk := body.read(_COPY_CHUNK):
                os.pwrite(fd, chunk, offset)
                digest.update(chunk)
                offset += len(chunk)
        except Exception as exc:
            translated = self._translate(exc, f"get {key}")
            raise translated from exc
        finally:
            body.close()
        expected = int(response["ContentLength"])
        if offset != expected:
            raise TemporaryStoreError(f"get {key}: got {offset} of {expected} bytes",
                                      "IncompleteBody")
        stored = dict(response.get("Metadata", {})).get(CHECKSUM_KEY)
        if stored is not None and stored != digest.hexdigest():
            raise TemporaryStoreError(f"get {key}: MD5 {digest.hexdigest()} is not the stored "
                                      f"checksum {stored}", "BadDigest")
        os.ftruncate(fd, offset)
        self._check_composite(key, response, fd, offset)
        return ObjectInfo(key=key, size=offset, mtime=response["LastModified"].timestamp(),
                          etag=str(response.get("ETag", "")).strip('"'),
                          metadata=dict(response.get("Metadata", {})))


    def _check_composite(self, key: str, response: dict[str, Any], fd: int, size: int) -> None:
        """A multipart object's composite checksum (``ChecksumMode=ENABLED``), recomputed
        from the downloaded data; the parts' size comes from a HEAD of part 1. A full-object
        checksum is checked by botocore itself as the body is read; an object without
        checksums (older tools, other writers) is checked by its length only: its ETag is
        not compared, since it is not always an MD5 (docs/dev/cachenode.md, Coherence)."""
        found = [(name, str(response[name])) for name in _COMPOSITE
                 if str(response.get(name) or "").rpartition("-")[2].isdigit()]
        if not found:
            return
        name, value = found[0]
        algorithm = _COMPOSITE[name]
        encoded, _, count = value.rpartition("-")
        head = self._call(f"head {key}#1", self._client.head_object, Bucket=self.bucket,
                          Key=self._k(key), PartNumber=1)
        part = int(head["ContentLength"])
        if part <= 0 or -(-size // part) != int(count):
            raise TemporaryStoreError(f"get {key}: {size} bytes are not {count} parts of "
                                      f"{part}", "BadDigest")
        digests = []
        for offset in range(0, size, part):
            digest = algorithm()
            _digests_of(fd, offset, min(part, size - offset), digest)
            digests.append(digest.digest())
        got = base64.b64encode(algorithm(b"".join(digests)).digest()).decode()
        if got != encoded:
            raise TemporaryStoreError(f"get {key}: {name} {got}-{count} is not the stored "
                                      f"{value}", "BadDigest")


def open_store(config: StoreConfig, max_pool: int = 16) -> ObjectStore:
    if config.scheme == "file":
        return LocalDirStore(config.local_path)
    return S3Store(config, max_pool=max_pool)

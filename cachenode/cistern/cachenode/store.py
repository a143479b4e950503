"""Object stores: the system of record behind the cache.

``ObjectStore`` is the contract; ``LocalDirStore`` (a directory, for the embedded default and
demos) and ``S3Store`` (boto3) implement it and pass the same contract tests. Keys are relative
to the store's prefix and use '/' separators. Every implementation classifies its errors:
``TemporaryStoreError`` (retrying may help: throttling, 5xx, timeouts, connection failures) or
``PermanentStoreError`` (it will not: missing bucket, bad credentials). A missing object is
``FileNotFoundError``.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from cistern.config import StoreConfig

__all__ = [
    "ObjectInfo",
    "ObjectStore",
    "PermanentStoreError",
    "StoreError",
    "TemporaryStoreError",
    "LocalDirStore",
    "S3Store",
    "open_store",
    "validate_key",
]

log = logging.getLogger(__name__)

MULTIPART_DIR = ".cistern-multipart"
_COPY_CHUNK = 8 * 2**20


class StoreError(Exception):
    """An object-store operation failed. ``code`` is the S3 error code or a short reason."""

    def __init__(self, message: str, code: str = "error") -> None:
        super().__init__(message)
        self.code = code


class TemporaryStoreError(StoreError):
    """Retrying may succeed (throttling, 5xx, timeouts, connection errors)."""

    @property
    def throttled(self) -> bool:
        return self.code in {"SlowDown", "503", "Throttling", "ThrottlingException",
                             "RequestLimitExceeded", "ServiceUnavailable"}


class PermanentStoreError(StoreError):
    """Retrying will not help until someone fixes something (bucket, credentials, policy)."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    mtime: float
    etag: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)


def validate_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"invalid object key {key!r}")
    return key


class ObjectStore(Protocol):
    """What the flusher and the read path need from the system of record."""

    description: str

    def check(self) -> None:
        """Verify the store is reachable and writable with these credentials."""

    def put_file(self, key: str, fd: int, size: int, metadata: dict[str, str]) -> str:
        """Upload ``size`` bytes from ``fd`` (offset 0) as one object; return its ETag."""

    def create_multipart(self, key: str, metadata: dict[str, str]) -> str:
        """Start a multipart upload; return its upload id."""

    def upload_part(self, key: str, upload_id: str, number: int, fd: int, offset: int,
                    length: int) -> str:
        """Upload one part from ``fd``; return its ETag."""

    def complete_multipart(self, key: str, upload_id: str, parts: list[tuple[int, str]]) -> str:
        """Assemble the parts; return the object's ETag."""

    def abort_multipart(self, key: str, upload_id: str) -> None:
        """Abort an upload; not an error if it is already gone."""

    def list_multipart(self, key: str) -> list[str]:
        """Upload ids of unfinished multipart uploads of exactly ``key``."""

    def copy(self, src: str, dst: str, metadata: dict[str, str] | None = None) -> None:
        """Server-side copy (replacing metadata when given)."""

    def delete(self, key: str) -> None:
        """Delete an object; not an error if it does not exist."""

    def head(self, key: str) -> ObjectInfo:
        """Object size, time and metadata; FileNotFoundError if missing."""

    def list_dir(self, prefix: str) -> tuple[list[ObjectInfo], list[str]]:
        """Objects directly under ``prefix`` ('' or ending in '/') and the sub-'directories'."""

    def list_all(self, prefix: str) -> Iterator[ObjectInfo]:
        """Every object whose key starts with ``prefix``, recursively."""

    def download(self, key: str, fd: int) -> ObjectInfo:
        """Write the whole object into ``fd`` from offset 0; return its info."""


def _md5_of(fd: int, offset: int, length: int) -> bytes:
    digest = hashlib.md5()
    remaining = length
    while remaining > 0:
        chunk = os.pread(fd, min(_COPY_CHUNK, remaining), offset)
        if not chunk:
            raise StoreError(f"local file shrank while reading at offset {offset}", "ShortRead")
        digest.update(chunk)
        offset += len(chunk)
        remaining -= len(chunk)
    return digest.digest()


class _FdReader:
    """A file-like view of ``fd[offset:offset+length]`` for streaming uploads."""

    def __init__(self, fd: int, offset: int, length: int) -> None:
        self._fd, self._start, self._length, self._pos = fd, offset, length, 0

    def read(self, size: int = -1) -> bytes:
        left = self._length - self._pos
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


class LocalDirStore:
    """Objects as files under a directory; multipart parts staged in a hidden folder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.description = f"file://{root}"

    def _path(self, key: str) -> Path:
        return self.root / validate_key(key)

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / MULTIPART_DIR / f".probe-{uuid.uuid4().hex}"
            probe.parent.mkdir(exist_ok=True)
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise PermanentStoreError(f"object store {self.root} is not writable: "
                                      f"{exc.strerror}", "NotWritable") from exc

    def _write_atomically(self, key: str, writer: Any, metadata: dict[str, str]) -> str:
        path = self._path(key)
        try:
            if path.is_dir():
                raise PermanentStoreError(f"{key}: a directory of that name exists", "Conflict")
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.part"
            digest = hashlib.md5()
            with open(tmp, "wb") as out:
                writer(out, digest)
                out.flush()
                os.fsync(out.fileno())
            if "mode" in metadata:
                os.chmod(tmp, int(metadata["mode"], 8) & 0o7777)
            if "mtime-ns" in metadata:
                ns = int(metadata["mtime-ns"])
                os.utime(tmp, ns=(ns, ns))
            os.replace(tmp, path)
        except FileNotFoundError as exc:
            raise TemporaryStoreError(f"{key}: {exc}", "Race") from exc
        except NotADirectoryError as exc:
            raise PermanentStoreError(f"{key}: a parent is a file in the store", "Conflict") \
                from exc
        except OSError as exc:
            raise TemporaryStoreError(f"{key}: {exc.strerror}", f"errno{exc.errno}") from exc
        return digest.hexdigest()

    def put_file(self, key: str, fd: int, size: int, metadata: dict[str, str]) -> str:
        def writer(out: Any, digest: Any) -> None:
            offset = 0
            while offset < size:
                chunk = os.pread(fd, min(_COPY_CHUNK, size - offset), offset)
                if not chunk:
                    raise StoreError(f"{key}: local file shrank during upload", "ShortRead")
                out.write(chunk)
                digest.update(chunk)
                offset += len(chunk)

        return self._write_atomically(key, writer, metadata)

    def _mpu_dir(self, upload_id: str) -> Path:
        if not upload_id.isalnum():
            raise ValueError(f"invalid upload id {upload_id!r}")
        return self.root / MULTIPART_DIR / upload_id

    def create_multipart(self, key: str, metadata: dict[str, str]) -> str:
        validate_key(key)
        upload_id = uuid.uuid4().hex
        folder = self._mpu_dir(upload_id)
        folder.mkdir(parents=True)
        (folder / "key").write_text(key)
        (folder / "metadata").write_text("\n".join(f"{k}={v}" for k, v in metadata.items()))
        return upload_id

    def upload_part(self, key: str, upload_id: str, number: int, fd: int, offset: int,
                    length: int) -> str:
        folder = self._mpu_dir(upload_id)
        if not folder.is_dir():
            raise PermanentStoreError(f"{key}: no such upload {upload_id}", "NoSuchUpload")
        digest = hashlib.md5()
        tmp = folder / f"{number}.tmp"
        with open(tmp, "wb") as out:
            pos, end = offset, offset + length
            while pos < end:
                chunk = os.pread(fd, min(_COPY_CHUNK, end - pos), pos)
                if not chunk:
                    raise StoreError(f"{key}: local file shrank during upload", "ShortRead")
                out.write(chunk)
                digest.update(chunk)
                pos += len(chunk)
            os.fsync(out.fileno())
        os.replace(tmp, folder / str(number))
        return digest.hexdigest()

    def complete_multipart(self, key: str, upload_id: str, parts: list[tuple[int, str]]) -> str:
        folder = self._mpu_dir(upload_id)
        if not folder.is_dir():
            raise PermanentStoreError(f"{key}: no such upload {upload_id}", "NoSuchUpload")
        meta = dict(line.split("=", 1) for line in
                    (folder / "metadata").read_text().splitlines() if "=" in line)

        def writer(out: Any, digest: Any) -> None:
            for number, _etag in sorted(parts):
                with open(folder / str(number), "rb") as part:
                    while chunk := part.read(_COPY_CHUNK):
                        out.write(chunk)
                        digest.update(chunk)

        etag = self._write_atomically(key, writer, meta)
        shutil.rmtree(folder, ignore_errors=True)
        return f"{etag}-{len(parts)}"

    def abort_multipart(self, key: str, upload_id: str) -> None:
        shutil.rmtree(self._mpu_dir(upload_id), ignore_errors=True)

    def list_multipart(self, key: str) -> list[str]:
        base = self.root / MULTIPART_DIR
        if not base.is_dir():
            return []
        found = []
        for folder in base.iterdir():
            try:
                if folder.is_dir() and (folder / "key").read_text() == key:
                    found.append(folder.name)
            except OSError:
                continue
        return found

    def copy(self, src: str, dst: str, metadata: dict[str, str] | None = None) -> None:
        src_path = self._path(src)
        try:
            fd = os.open(src_path, os.O_RDONLY)
        except FileNotFoundError:
            raise
        try:
            size = os.fstat(fd).st_size
            if metadata is None:
                st = os.fstat(fd)
                metadata = {"mode": oct(st.st_mode & 0o7777), "mtime-ns": str(st.st_mtime_ns)}
            self.put_file(dst, fd, size, metadata)
        finally:
            os.close(fd)

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink()
        except FileNotFoundError:
            return
        except IsADirectoryError:
            return
        # Remove emptied parent folders so the listing matches S3, where folders are implicit.
        parent = path.parent
        while parent != self.root:
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent

    def _info(self, key: str, st: os.stat_result) -> ObjectInfo:
        return ObjectInfo(key=key, size=st.st_size, mtime=st.st_mtime,
                          metadata={"mode": oct(st.st_mode & 0o7777),
                                    "mtime-ns": str(st.st_mtime_ns)})

    def head(self, key: str) -> ObjectInfo:
        st = self._path(key).stat()
        if not os.path.isfile(self._path(key)):
            raise FileNotFoundError(key)
        return self._info(key, st)

    def list_dir(self, prefix: str) -> tuple[list[ObjectInfo], list[str]]:
        folder = self.root / prefix if prefix else self.root
        files: list[ObjectInfo] = []
        dirs: list[str] = []
        try:
            entries = list(os.scandir(folder))
        except (FileNotFoundError, NotADirectoryError):
            return [], []
        for entry in entries:
            if entry.name == MULTIPART_DIR or (entry.name.startswith(".")
                                               and entry.name.endswith(".part")):
                continue
            if entry.is_dir(follow_symlinks=False):
                dirs.append(f"{prefix}{entry.name}/")
            elif entry.is_file(follow_symlinks=False):
                files.append(self._info(prefix + entry.name, entry.stat()))
        return files, dirs

    def list_all(self, prefix: str) -> Iterator[ObjectInfo]:
        files, dirs = self.list_dir(prefix)
        yield from files
        for sub in dirs:
            yield from self.list_all(sub)

    def download(self, key: str, fd: int) -> ObjectInfo:
        path = self._path(key)
        with open(path, "rb") as src:
            st = os.fstat(src.fileno())
            offset = 0
            while chunk := src.read(_COPY_CHUNK):
                os.pwrite(fd, chunk, offset)
                offset += len(chunk)
        os.ftruncate(fd, offset)
        return self._info(key, st)


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
                s3={"addressing_style": "path" if config.path_style else "auto"},
                retries={"max_attempts": 1, "mode": "standard"},
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

    def put_file(self, key: str, fd: int, size: int, metadata: dict[str, str]) -> str:
        md5 = _md5_of(fd, 0, size)
        response = self._call(
            f"put {key}", self._client.put_object, Bucket=self.bucket, Key=self._k(key),
            Body=_FdReader(fd, 0, size), ContentLength=size,
            ContentMD5=base64.b64encode(md5).decode(), Metadata=metadata)
        etag = str(response.get("ETag", "")).strip('"')
        if etag and etag != md5.hex():
            raise TemporaryStoreError(f"put {key}: ETag {etag} does not match MD5 {md5.hex()}",
                                      "BadDigest")
        return etag

    def create_multipart(self, key: str, metadata: dict[str, str]) -> str:
        response = self._call(f"create-multipart {key}", self._client.create_multipart_upload,
                              Bucket=self.bucket, Key=self._k(key), Metadata=metadata)
        return str(response["UploadId"])

    def upload_part(self, key: str, upload_id: str, number: int, fd: int, offset: int,
                    length: int) -> str:
        md5 = _md5_of(fd, offset, length)
        response = self._call(
            f"upload-part {key}#{number}", self._client.upload_part, Bucket=self.bucket,
            Key=self._k(key), UploadId=upload_id, PartNumber=number,
            Body=_FdReader(fd, offset, length), ContentLength=length,
            ContentMD5=base64.b64encode(md5).decode())
        return str(response["ETag"])

    def complete_multipart(self, key: str, upload_id: str, parts: list[tuple[int, str]]) -> str:
        response = self._call(
            f"complete-multipart {key}", self._client.complete_multipart_upload,
            Bucket=self.bucket, Key=self._k(key), UploadId=upload_id,
            MultipartUpload={"Parts": [{"PartNumber": n, "ETag": e} for n, e in sorted(parts)]})
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
                              Key=self._k(key))
        body = response["Body"]
        offset = 0
        try:
            while chunk := body.read(_COPY_CHUNK):
                os.pwrite(fd, chunk, offset)
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
        os.ftruncate(fd, offset)
        return ObjectInfo(key=key, size=offset, mtime=response["LastModified"].timestamp(),
                          etag=str(response.get("ETag", "")).strip('"'),
                          metadata=dict(response.get("Metadata", {})))


def open_store(config: StoreConfig, max_pool: int = 16) -> ObjectStore:
    if config.scheme == "file":
        return LocalDirStore(config.local_path)
    return S3Store(config, max_pool=max_pool)

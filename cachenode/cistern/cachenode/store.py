"""Object stores: the system of record behind the cache (the S3 one lives in s3store.py).

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
import threading
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import xxhash

__all__ = [
    "CHECKSUM_KEY",
    "MAX_PARTS",
    "MAX_SINGLE_PUT",
    "part_size_for",
    "hash_range",
    "ObjectInfo",
    "ObjectStore",
    "PermanentStoreError",
    "PreconditionFailed",
    "StoreError",
    "TemporaryStoreError",
    "LocalDirStore",
    "validate_key",
    "PartChecksum",
    "part_fingerprint",
    "part_receipt",
    "receipt_checksum",
    "receipt_fingerprint",
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


class PreconditionFailed(PermanentStoreError):
    """A conditional write found another version at the key (HTTP 412): another writer
    changed the object. A conflict, never retried (docs/dev/cachenode.md, Coherence)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "PreconditionFailed")


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    mtime: float
    etag: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)


CHECKSUM_KEY = "cistern-md5"
"""Metadata holding the MD5 (hex) of a single-PUT object's body, written with the object by
this node (S3Store) or by a peer's rescue, and checked by every download (an ETag is not
always an MD5, so it cannot be the reference)."""


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

    def put_file(self, key: str, fd: int, size: int, metadata: dict[str, str],
                 if_match: str | None = None, if_none_match: bool = False) -> str:
        """Upload ``size`` bytes from ``fd`` (offset 0) as one object; return its ETag.
        With ``if_match``, only over the object of that ETag, with ``if_none_match`` only if
        there is no object at ``key``; else ``PreconditionFailed``."""

    def create_multipart(self, key: str, metadata: dict[str, str]) -> str:
        """Start a multipart upload; return its upload id."""

    def upload_part(self, key: str, upload_id: str, number: int, fd: int, offset: int,
                    length: int) -> str:
        """Upload one part from ``fd``; return its ``part_receipt`` (ETag and checksum)."""

    def complete_multipart(self, key: str, upload_id: str, parts: list[tuple[int, str]],
                           if_match: str | None = None, if_none_match: bool = False) -> str:
        """Assemble the parts; return the object's ETag. Conditions as for ``put_file``
        (a store may ignore ``if_match`` here: moto does; see docs/dev/cachenode.md)."""

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


class PartChecksum:
    """The integrity checksum of a multipart part, and the only place that chooses it.

    CRC32 as S3's ``x-amz-checksum-crc32`` (base64 of the big-endian value): zlib computes it
    at several GB/s and releases the GIL, where MD5 (Content-MD5) ran at ~600 MB/s in the
    node's Python and competed with the writer and the store for the CPU. The store verifies
    it on receipt (``S3Store`` sends it; a mismatch is ``BadDigest``, retried). The streamer
    compares the ``fingerprint`` — an XXH3-64 of the same pass — with the final content of
    parts sent early (streamer.py), so a rewrite behind the upload front is missed with a
    chance of about 2**-64. The check of the final content hashes with XXH3 alone (8.5 GB/s
    here, against 3.2 for CRC32 and 2.5 for the Adler-32 the fingerprint used to add to it):
    streaming a file now costs one CRC32 pass and two cheap ones instead of four
    (docs/benchmarks.md, "Durable sooner, third pass").
    """

    def __init__(self) -> None:
        self._crc = 0
        self._xxh = xxhash.xxh3_64()

    def update(self, chunk: bytes) -> None:
        self._crc = zlib.crc32(chunk, self._crc)
        self._xxh.update(chunk)

    def value(self) -> str:
        """What the store verifies: ``x-amz-checksum-crc32``."""
        return base64.b64encode(self._crc.to_bytes(4, "big")).decode()

    def fingerprint(self) -> str:
        return self._xxh.hexdigest()


MAX_PARTS = 10_000
"""S3's limit on the parts of one multipart upload."""
MAX_SINGLE_PUT = 5 * 2**30
"""S3's limit on one PUT (5 GiB)."""


def part_size_for(size: int, preferred: int) -> int:
    """``preferred``, or the smallest part size that fits ``size`` bytes in ``MAX_PARTS``."""
    return max(preferred, -(-size // MAX_PARTS))


def hash_range(fd: int, offset: int, length: int, *digests: Any) -> int:
    """Feed ``fd[offset:offset+length]`` to every digest (hashlib's ``update`` interface) in
    one pass of ``pread``s; return how many bytes were read (fewer if the file is shorter)."""
    done = 0
    while done < length:
        chunk = os.pread(fd, min(_COPY_CHUNK, length - done), offset + done)
        if not chunk:
            break
        for digest in digests:
            digest.update(chunk)
        done += len(chunk)
    return done


def part_fingerprint(fd: int, offset: int, length: int) -> str:
    """``PartChecksum.fingerprint`` of ``fd[offset:offset+length]`` (fewer bytes if the file
    is shorter): XXH3 alone, no CRC32."""
    digest = xxhash.xxh3_64()
    hash_range(fd, offset, length, digest)
    return digest.hexdigest()


def part_receipt(etag: str, checksum: PartChecksum) -> str:
    """What ``upload_part`` returns: the part's ETag, the CRC32 the store verified and the
    fingerprint of the same bytes (``etag crc32:fingerprint``)."""
    return f"{etag} {checksum.value()}:{checksum.fingerprint()}"


def receipt_fingerprint(receipt: str) -> str:
    return receipt.rsplit(" ", 1)[-1].split(":", 1)[-1]


def receipt_checksum(receipt: str) -> str:
    """The ``x-amz-checksum-crc32`` in a ``part_receipt`` (CompleteMultipartUpload repeats it)."""
    return receipt.rsplit(" ", 1)[-1].split(":", 1)[0]


class _Both:
    """Feeds two digests at once."""

    def __init__(self, first: Any, second: Any) -> None:
        self._first, self._second = first, second

    def update(self, chunk: bytes) -> None:
        self._first.update(chunk)
        self._second.update(chunk)


def _copy_range(key: str, fd: int, offset: int, length: int, out: Any, digest: Any) -> None:
    """Copy ``fd[offset:offset+length]`` into ``out``, feeding ``digest`` on the way."""
    end = offset + length
    while offset < end:
        chunk = os.pread(fd, min(_COPY_CHUNK, end - offset), offset)
        if not chunk:
            raise StoreError(f"{key}: local file shrank during upload", "ShortRead")
        out.write(chunk)
        digest.update(chunk)
        offset += len(chunk)


class LocalDirStore:
    """Objects as files under a directory; multipart parts staged in a hidden folder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._conditional = threading.Lock()
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

    def put_file(self, key: str, fd: int, size: int, metadata: dict[str, str],
                 if_match: str | None = None, if_none_match: bool = False) -> str:
        def write() -> str:
            return self._write_atomically(
                key, lambda out, digest: _copy_range(key, fd, 0, size, out, digest), metadata)

        return self._conditionally(f"put {key}", key, write, if_match, if_none_match)

    def _conditionally(self, what: str, key: str, write: Any, if_match: str | None,
                       if_none_match: bool) -> str:
        if if_match is None and not if_none_match:
            return str(write())
        # The check and the write are atomic against this process's writers only; another
        # process writing the directory between them is not seen (a limit of this store).
        with self._conditional:
            current = self._etag_of(key)
            # This store's multipart ETag is the MD5 of the whole object plus "-<parts>".
            if (current is not None) if if_match is None \
                    else (current is None or if_match.split("-", 1)[0] != current):
                raise PreconditionFailed(f"{what}: the object is {current or 'absent'}, "
                                         f"not {if_match}")
            return str(write())

    def _etag_of(self, key: str) -> str | None:
        digest = hashlib.md5()
        try:
            with open(self._path(key), "rb") as f:
                while chunk := f.read(_COPY_CHUNK):
                    digest.update(chunk)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None
        return digest.hexdigest()

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
        digest, checksum = hashlib.md5(), PartChecksum()
        tmp = folder / f"{number}.tmp"
        with open(tmp, "wb") as out:
            _copy_range(key, fd, offset, length, out, _Both(digest, checksum))
            os.fsync(out.fileno())
        os.replace(tmp, folder / str(number))
        return part_receipt(digest.hexdigest(), checksum)

    def complete_multipart(self, key: str, upload_id: str, parts: list[tuple[int, str]],
                           if_match: str | None = None, if_none_match: bool = False) -> str:
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

        etag = self._conditionally(f"complete-multipart {key}", key,
                                   lambda: self._write_atomically(key, writer, meta),
                                   if_match, if_none_match)
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

"""Multipart uploads staged on the node, outside the namespace, durable before each ack.

Layout under ``<cache dir>/s3api/uploads/<upload id>/``:
  ``upload.json``           the key and when the upload started (fsync'd with its directory)
  ``part-NNNNN-<md5 hex>``  one file per part: written as ``.part-…`` , fsync'd, renamed (and
                            the directory fsync'd) before UploadPart answers; a part uploaded
                            again replaces the older file.
Nothing here is visible through the mount or to the flusher. ``Complete`` assembles the parts
into the object's temporary file with ``copy_file_range`` (a reflink on XFS/btrfs, an in-kernel
copy elsewhere), then commits it like a PUT; the staging directory is removed after that.
The cache disk holds both while the object is assembled.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from cistern.cachenode.s3api.errors import S3Error

__all__ = ["MAX_PART_NUMBER", "MIN_PART_SIZE", "Part", "Upload", "UploadStaging"]

log = logging.getLogger(__name__)

MIN_PART_SIZE = 5 * 2**20
"""S3's minimum size of every part but the last."""
MAX_PART_NUMBER = 10000
MAX_UPLOADS = 1000
"""Uploads staged at once on a node; more are refused with 503 SlowDown."""
EXPIRY_SECONDS = 7 * 24 * 3600
"""Uploads neither completed nor aborted for this long are removed at start-up."""
_ID = re.compile(r"^[0-9a-f]{32}$")
_PART = re.compile(r"^part-(\d{5})-([0-9a-f]{32})$")


@dataclass(frozen=True)
class Part:
    number: int
    etag: str
    """Quoted MD5 hex, as S3 returns it."""
    size: int
    mtime: float
    path: Path


@dataclass(frozen=True)
class Upload:
    upload_id: str
    key: str
    initiated: float


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class UploadStaging:
    """The staged multipart uploads of one node. Blocking calls: run them off the loop."""

    def __init__(self, state_dir: Path) -> None:
        self.root = state_dir / "uploads"
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def _dir(self, upload_id: str) -> Path:
        if not _ID.match(upload_id):
            raise S3Error("NoSuchUpload", "The specified upload does not exist.",
                          resource=upload_id[:64])
        path = self.root / upload_id
        if not (path / "upload.json").exists():
            raise S3Error("NoSuchUpload", "The specified upload does not exist.",
                          resource=upload_id)
        return path

    def create(self, key: str) -> str:
        with self._lock:
            if sum(1 for _ in self.root.iterdir()) >= MAX_UPLOADS:
                raise S3Error("SlowDown", "Too many multipart uploads in progress on this node.")
            upload_id = secrets.token_hex(16)
            path = self.root / upload_id
            path.mkdir()
        meta = path / "upload.json"
        with open(meta, "w") as f:
            json.dump({"key": key, "initiated": time.time()}, f)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(path)
        _fsync_dir(self.root)
        return upload_id

    def get(self, upload_id: str, key: str) -> Upload:
        path = self._dir(upload_id)
        meta = json.loads((path / "upload.json").read_text())
        if meta.get("key") != key:
            raise S3Error("NoSuchUpload", "The specified upload does not exist for this key.",
                          resource=key)
        return Upload(upload_id, key, float(meta["initiated"]))

    def begin_part(self, upload: Upload, number: int) -> tuple[int, Path]:
        """An open file for a new part and its temporary path (see ``commit_part``)."""
        if not 1 <= number <= MAX_PART_NUMBER:
            raise S3Error("InvalidArgument", "Part number must be an integer between 1 and "
                          "10000, inclusive.")
        tmp = self._dir(upload.upload_id) / f".part-{number:05d}-{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        return fd, tmp

    def commit_part(self, upload: Upload, number: int, fd: int, tmp: Path, md5_hex: str) -> str:
        """fsync the part, give it its final name (replacing an older upload of the same
        number) and fsync the directory; return its ETag."""
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        path = self._dir(upload.upload_id)
        final = path / f"part-{number:05d}-{md5_hex}"
        os.replace(tmp, final)
        for old in path.glob(f"part-{number:05d}-*"):
            if old != final:
                old.unlink(missing_ok=True)
        _fsync_dir(path)
        return f'"{md5_hex}"'

    @staticmethod
    def discard_part(fd: int, tmp: Path) -> None:
        os.close(fd)
        tmp.unlink(missing_ok=True)

    def parts(self, upload: Upload) -> list[Part]:
        out = []
        for item in self._dir(upload.upload_id).iterdir():
            m = _PART.match(item.name)
            if m:
                st = item.stat()
                out.append(Part(int(m.group(1)), f'"{m.group(2)}"', st.st_size, st.st_mtime,
                                item))
        out.sort(key=lambda p: p.number)
        return out

    def plan(self, upload: Upload, wanted: list[tuple[int, str]]) -> tuple[list[Part], str]:
        """Check the part list of a CompleteMultipartUpload; return the parts and the ETag."""
        if not wanted:
            raise S3Error("MalformedXML", "You must specify at least one part.")
        have = {p.number: p for p in self.parts(upload)}
        chosen: list[Part] = []
        last = 0
        for number, etag in wanted:
            if number <= last:
                raise S3Error("InvalidPartOrder", "The list of parts was not in ascending "
                              "order. The parts list must be specified in order by part number.")
            last = number
            part = have.get(number)
            if part is None or part.etag.strip('"') != etag.strip().strip('"').lower():
                raise S3Error("InvalidPart", "One or more of the specified parts could not be "
                              "found. The part may not have been uploaded, or the specified "
                              "entity tag may not match the part's entity tag.",
                              resource=f"part {number}")
            chosen.append(part)
        for part in chosen[:-1]:
            if part.size < MIN_PART_SIZE:
                raise S3Error("EntityTooSmall", "Your proposed upload is smaller than the "
                              "minimum allowed object size.", resource=f"part {part.number}")
        digest = hashlib.md5(b"".join(bytes.fromhex(p.etag.strip('"')) for p in chosen))
        return chosen, f'"{digest.hexdigest()}-{len(chosen)}"'

    def remove(self, upload_id: str) -> None:
        path = self._dir(upload_id)
        shutil.rmtree(path, ignore_errors=True)

    def uploads(self) -> list[Upload]:
        out = []
        for item in self.root.iterdir():
            try:
                meta = json.loads((item / "upload.json").read_text())
                out.append(Upload(item.name, str(meta["key"]), float(meta["initiated"])))
            except (OSError, ValueError, KeyError):
                continue
        out.sort(key=lambda u: (u.key, u.initiated))
        return out

    def expire(self, max_age: float = EXPIRY_SECONDS) -> int:
        """Remove uploads older than ``max_age`` and staging debris; return how many."""
        removed = 0
        now = time.time()
        for item in self.root.iterdir():
            try:
                meta = json.loads((item / "upload.json").read_text())
                stale = now - float(meta["initiated"]) > max_age
            except (OSError, ValueError, KeyError):
                stale = True  # a crash between mkdir and upload.json: never acknowledged
            if stale:
                shutil.rmtree(item, ignore_errors=True)
                removed += 1
            else:
                for tmp in item.glob(".part-*"):
                    tmp.unlink(missing_ok=True)
        if removed:
            log.info("s3 endpoint: removed %d expired or unfinished multipart upload(s)",
                     removed)
        return removed

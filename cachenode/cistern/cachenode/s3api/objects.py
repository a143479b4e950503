"""Objects as files of the cache namespace, through the ``CacheCore`` facade (blocking calls).

An object is written the way a careful POSIX writer does it, so it gets the same write-back
rules as a file written through the mount: create a hidden temporary file in the target's
directory (``.cistern-s3.<id>``), write, rename it over the key, then ``fsync`` it (data file +
journal commit, covering the rename) before the PUT is acknowledged. A GET never sees half an
object; the temporary file is renamed before its upload is due, so it is uploaded once, under
its key. A marker file per write in ``<state>/inflight`` names the temporary file, so that one
left by a crash is removed at the next start instead of reaching the bucket.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

from cistern.cachenode.core import ROOT_INO, Attr, CacheCore, Handle
from cistern.cachenode.s3api.errors import S3Error
from cistern.cachenode.s3api.etags import EtagBook
from cistern.cachenode.s3api.keys import TEMP_PREFIX, split_key

__all__ = ["CacheObjects", "ObjectWriter"]

log = logging.getLogger(__name__)



@dataclass
class ObjectWriter:
    """One object being written into a hidden temporary file of its directory."""

    objects: CacheObjects
    key: str
    parent: int
    name: str
    temp: str
    handle: Handle
    marker: Path
    offset: int = 0
    done: bool = False

    def write(self, data: bytes) -> None:
        while data:
            n = self.objects.core.write(self.handle, self.offset, data)
            self.offset += n
            data = data[n:]  # a short write to a regular file is rare: copy only then

    def copy_from(self, fd: int, size: int) -> None:
        """Append ``size`` bytes of ``fd`` (from its offset 0) in the kernel: copy_file_range
        (a reflink or an in-kernel copy), never through Python buffers."""
        src_off = 0
        while src_off < size:
            n = os.copy_file_range(fd, self.handle.fd, size - src_off, src_off, self.offset)
            if n == 0:
                raise OSError(errno.EIO, "source shorter than expected")
            src_off += n
            self.offset += n

    def commit(self, etag: str | None = None) -> Attr:
        """Make the object visible under its key and durable on the node; return its attrs."""
        core = self.objects.core
        try:
            core.rename(self.parent, self.temp, self.parent, self.name)
        except OSError:
            self.abort()
            raise
        self.done = True
        try:
            core.fsync(self.handle)  # data file + journal (with the rename) on disk
        finally:
            core.release(self.handle)
            self.marker.unlink(missing_ok=True)
        attr = core.getattr(self.handle.ino)
        if etag is not None:
            self.objects.remember_etag(self.key, attr, etag)
        return attr

    def abort(self) -> None:
        if self.done:
            return
        self.done = True
        core = self.objects.core
        try:
            core.release(self.handle)
        finally:
            try:
                core.unlink(self.parent, self.temp)
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    log.warning("s3 endpoint: cannot remove temporary file of %s: %s",
                                self.key, exc)
            self.marker.unlink(missing_ok=True)


class CacheObjects:
    """Keys ↔ namespace entries. Every method blocks (call it off the event loop)."""

    def __init__(self, core: CacheCore, state_dir: Path) -> None:
        self.core = core
        self._inflight = state_dir / "inflight"
        self._inflight.mkdir(parents=True, exist_ok=True)
        self._etags = EtagBook(state_dir / "etags.sqlite")

    # ---------------------------------------------------------------- ETags

    def remember_etag(self, key: str, attr: Attr, etag: str) -> None:
        self._etags.put(key, attr, etag)

    def etag(self, key: str, attr: Attr) -> str:
        """The MD5 ETag seen at write time while the file is unchanged, else an opaque one."""
        return self._etags.get(key, attr)

    # ---------------------------------------------------------------- lookups

    def lookup(self, key: str) -> Attr | None:
        """The file at ``key``, or None (a directory is not an object; ``dir/`` is no file)."""
        parts = split_key(key, allow_dir=True)
        if key.endswith("/"):
            return None
        ino = ROOT_INO
        for part in parts[:-1]:
            attr = self.core.find(ino, part)
            if attr is None or not stat.S_ISDIR(attr.mode):
                return None
            ino = attr.ino
        attr = self.core.find(ino, parts[-1])
        if attr is None or stat.S_ISDIR(attr.mode):
            return None
        return attr

    def find_dir(self, parts: list[str]) -> int | None:
        ino = ROOT_INO
        for part in parts:
            attr = self.core.find(ino, part)
            if attr is None or not stat.S_ISDIR(attr.mode):
                return None
            ino = attr.ino
        return ino

    def _make_dirs(self, parts: list[str], key: str) -> int:
        ino = ROOT_INO
        for part in parts:
            attr = self.core.find(ino, part)
            if attr is None:
                try:
                    attr = self.core.mkdir(ino, part, 0o755, 0, 0)
                except OSError as exc:
                    if exc.errno != errno.EEXIST:
                        raise
                    attr = self.core.lookup(ino, part)
            if not stat.S_ISDIR(attr.mode):
                raise S3Error("InvalidArgument", "An object exists where this key needs a "
                              "directory (keys are paths in this cache).", resource=key)
            ino = attr.ino
        return ino

    def make_dir(self, key: str) -> None:
        """A zero-byte ``dir/`` key: a directory in the namespace (durable on return)."""
        self._make_dirs(split_key(key, allow_dir=True), key)
        self.sync()

    # ---------------------------------------------------------------- writes

    def begin(self, key: str) -> ObjectWriter:
        parts = split_key(key)
        temp = f"{TEMP_PREFIX}{secrets.token_hex(8)}"
        for attempt in range(3):
            parent = self._make_dirs(parts[:-1], key)
            existing = self.core.find(parent, parts[-1])
            if existing is not None and stat.S_ISDIR(existing.mode):
                raise S3Error("InvalidArgument", "A directory exists at this key (keys are "
                              "paths in this cache).", resource=key)
            marker = self._inflight / temp
            marker.write_text("/".join([*parts[:-1], temp]))
            try:
                handle, _ = self.core.create(parent, temp, 0o644, os.O_WRONLY, 0, 0)
            except OSError as exc:
                marker.unlink(missing_ok=True)
                # A concurrent delete may have pruned the directory just made: try again.
                if exc.errno == errno.ENOENT and attempt < 2:
                    continue
                raise
            return ObjectWriter(self, key, parent, parts[-1], temp, handle, marker)
        raise AssertionError("unreachable")

    def sweep_leftovers(self) -> int:
        """Remove temporary files a crash left in the namespace (named by inflight markers)."""
        removed = 0
        for marker in self._inflight.iterdir():
            parts = marker.read_text().split("/")
            if parts and parts[-1].startswith(TEMP_PREFIX):
                parent = self.find_dir(parts[:-1])
                if parent is not None:
                    try:
                        self.core.unlink(parent, parts[-1])
                        removed += 1
                    except OSError as exc:
                        if exc.errno != errno.ENOENT:
                            raise
            marker.unlink(missing_ok=True)
        if removed:
            log.info("s3 endpoint: removed %d unfinished object(s) left by a restart", removed)
        return removed

    # ---------------------------------------------------------------- reads

    def open(self, key: str) -> tuple[Handle, Attr]:
        attr = self.lookup(key)
        if attr is None:
            raise S3Error("NoSuchKey", "The specified key does not exist.", resource=key)
        handle = self.core.open(attr.ino, os.O_RDONLY)
        return handle, self.core.getattr(attr.ino)

    def read(self, handle: Handle, offset: int, size: int) -> bytes:
        return self.core.read(handle, offset, size)

    def close(self, handle: Handle) -> None:
        self.core.release(handle)

    # ---------------------------------------------------------------- deletes

    def sync(self) -> None:
        """Make the namespace changes so far survive a power loss (one journal sync)."""
        self.core.sync_namespace()

    def delete(self, key: str) -> None:
        """Delete ``key`` if it exists (S3 deletes are idempotent); prune emptied directories
        so the namespace keeps no prefixes S3 would not show. Durable after ``sync``."""
        parts = split_key(key, allow_dir=True)
        dirs = [ROOT_INO]
        for part in parts[:-1]:
            attr = self.core.find(dirs[-1], part)
            if attr is None or not stat.S_ISDIR(attr.mode):
                return
            dirs.append(attr.ino)
        attr = self.core.find(dirs[-1], parts[-1])
        if attr is None:
            return
        try:
            if stat.S_ISDIR(attr.mode):
                if not key.endswith("/"):
                    return
                self.core.rmdir(dirs[-1], parts[-1])
            else:
                self.core.unlink(dirs[-1], parts[-1])
                self._etags.forget(key)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTEMPTY):
                return
            raise
        for depth in range(len(parts) - 1, 0, -1):
            try:
                self.core.rmdir(dirs[depth - 1], parts[depth - 1])
            except OSError:
                break

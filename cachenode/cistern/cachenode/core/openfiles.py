"""Open files and their data: open, read, write, fsync, close, truncate and attributes.

A file becomes DIRTY (journaled) when it is opened for writing, before any byte can change;
``fsync`` makes the data file, its directory and the journal durable (invariant 1). In
write-through mode ``flush``/``fsync`` also wait until the store has the file.
"""

from __future__ import annotations

import errno
import itertools
import os
import time
from collections.abc import Callable

from cistern.cachenode.core.admission import Admission
from cistern.cachenode.core.datafiles import DataFiles
from cistern.cachenode.core.model import Attr, Handle, err
from cistern.cachenode.core.readthrough import ReadThrough
from cistern.cachenode.core.replication import FileVersion, NoReplication, Replication
from cistern.cachenode.core.tree import Tree
from cistern.cachenode.core.workqueue import WorkQueue
from cistern.cachenode.journal import CLEAN, DIRTY, Entry
from cistern.config import FlushPolicy

__all__ = ["OpenFiles"]

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR
ADMIT_EVERY = 16 * 2**20
"""A writer passes admission again after this many bytes."""
WRITE_THROUGH_TIMEOUT = 600.0
"""Seconds close/fsync wait for the store in write-through mode before answering EIO."""


class OpenFiles:
    def __init__(self, tree: Tree, queue: WorkQueue, datafiles: DataFiles,
                 readthrough: ReadThrough, admission: Admission, policy: FlushPolicy,
                 replication: Replication | None = None) -> None:
        self._tree = tree
        self._queue = queue
        self._files = datafiles
        self._readthrough = readthrough
        self._admission = admission
        self.write_through = policy.mode == "writeThrough"
        self.replication: Replication = replication or NoReplication()
        self._replicating = replication is not None and not isinstance(replication,
                                                                        NoReplication)
        self._handles: dict[int, Handle] = {}
        self._fh = itertools.count(1)

    def open_handle(self, entry: Entry, flags: int, writable: bool) -> Handle:
        if writable:
            if entry.writers == 0 or entry.state != DIRTY or entry.synced:
                self._queue.mark_dirty(entry)
            entry.writers += 1
            self._queue.recount(entry)
            entry.gen += 1
            self._admission.writing.add(entry.ino)
        if entry.opens == 0 and entry.state == CLEAN:
            self._tree.on_event("hit_bytes", entry.size)
        entry.opens += 1
        entry.last_access = time.monotonic()
        handle = Handle(fh=next(self._fh), ino=entry.ino, flags=flags, writable=writable,
                        fd=entry.fd)
        self._handles[handle.fh] = handle
        return handle

    def open(self, ino: int, flags: int) -> Handle:
        writable = bool(flags & _WRITE_FLAGS)
        truncate = bool(flags & os.O_TRUNC) and writable
        tree = self._tree
        with tree.lock:
            entry = tree.get(ino)
            if entry.is_dir:
                raise err(errno.EISDIR)
        if writable:
            self._admission.admit(new_file=False)
        if not truncate:
            self._readthrough.revalidate(entry)  # coherence: another writer's change
        while True:
            with tree.lock:
                if entry.unlinked:
                    raise err(errno.ENOENT)
                # Re-checked under the lock: eviction may have dropped a copy fetched a
                # moment ago, and an empty data file must never stand in for the object.
                if entry.local or truncate or entry.fd >= 0:
                    if entry.fd < 0:
                        entry.fd = os.open(self._files.create_path(ino),
                                           os.O_RDWR | os.O_CREAT, 0o600)
                        entry.local = True
                    handle = self.open_handle(entry, flags, writable)
                    if truncate:
                        self.truncate(entry, 0)
                    return handle
            self._readthrough.fetch(entry)

    @staticmethod
    def read(handle: Handle, offset: int, size: int) -> bytes:
        return os.pread(handle.fd, size, offset)

    @staticmethod
    def write_may_wait(handle: Handle, size: int) -> bool:
        """This write of ``size`` bytes passes admission (and may wait for space)."""
        return handle.written + size >= ADMIT_EVERY

    def write(self, handle: Handle, offset: int, data: bytes) -> int:
        offset = self._before_write(handle, offset, len(data))
        return os.pwrite(handle.fd, data, offset)

    def write_with(self, handle: Handle, offset: int, size: int,
                   copy: Callable[[int, int], int]) -> int:
        """``write`` of data the caller moves itself: ``copy(fd, offset)`` puts the ``size``
        bytes at ``offset`` of the data file and returns how many it wrote (a front end
        splicing them from /dev/fuse, say)."""
        return copy(handle.fd, self._before_write(handle, offset, size))

    def _before_write(self, handle: Handle, offset: int, size: int) -> int:
        """Checks and admission of a write; returns the offset it goes to."""
        if not handle.writable:
            raise err(errno.EBADF)
        if handle.flags & os.O_APPEND:
            offset = os.fstat(handle.fd).st_size
        handle.written += size
        if handle.written >= ADMIT_EVERY:
            handle.written = 0
            self._admission.admit(new_file=False)
        return offset

    def flush(self, handle: Handle) -> None:
        """close(2) on one descriptor: nothing to wait for in write-back mode; in write-through
        mode, upload what the file holds now and return when the store has it."""
        if self.write_through and handle.writable:
            self._upload_now_and_wait(handle.ino)
        elif handle.writable and self._replicating:
            # Level peers: what was written since the last fsync goes to the peers at close
            # too (DCP fsyncs `.metadata.tmp` before its buffer is written, then closes and
            # renames it): close-to-peer, so a rescue or a peer read never sees it empty.
            version = self._peer_version(handle)
            if version is not None:
                self.replication.replicate(version, if_changed=True)

    def _peer_version(self, handle: Handle) -> FileVersion | None:
        tree = self._tree
        with tree.lock:
            entry = tree.entries.get(handle.ino)
            if entry is None or entry.unlinked or entry.state != DIRTY:
                return None
            key = tree.key_of(entry)
            if self.replication.level(key) != "peers":
                return None
            st = os.fstat(handle.fd)
            return FileVersion(key=key, fd=os.dup(handle.fd), size=st.st_size,
                               mtime_ns=st.st_mtime_ns, mode=entry.mode,
                               etag=entry.etag if entry.remote_key == key else None)

    def _upload_now_and_wait(self, ino: int) -> None:
        tree = self._tree
        with tree.lock:
            entry = tree.entries.get(ino)
            if entry is None or entry.unlinked or entry.state != DIRTY:
                return
            entry.gen += 1
            target = entry.sync_wanted = entry.gen
            entry.due = 0.0
            self._queue.add_pending(entry)
            tree.changed.notify_all()
            deadline = time.monotonic() + WRITE_THROUGH_TIMEOUT
            while entry.durable_gen < target and not entry.unlinked:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise err(errno.EIO, "write-through: the object store did not take the "
                              "file in time (it stays dirty and will be retried)")
                tree.changed.wait(min(left, 0.5))

    def fsync(self, handle: Handle, datasync: bool = False) -> None:
        # Always a full fsync, even for fdatasync: the "synced" mark below records the data
        # file's mtime, which recovery compares after a power loss.
        os.fsync(handle.fd)
        tree = self._tree
        version: FileVersion | None = None
        level = "local"
        with tree.lock:
            entry = tree.entries.get(handle.ino)
            if entry is not None and not entry.unlinked:
                self._sync_size(entry)
                entry.synced = entry.state == DIRTY
                tree.journal.update(entry)
                if entry.synced and self._replicating:
                    # Durability levels (issue 17, docs/dev/peers.md): decided per path.
                    level = self.replication.level(tree.key_of(entry))
        if level == "peers":
            version = self._peer_version(handle)
        self._files.sync_dir(self._files.path(handle.ino).parent)
        tree.journal.sync()
        if version is not None:  # after the local fsync: a copy never precedes the original
            self.replication.replicate(version)
        if (self.write_through or level == "s3") and handle.writable:
            self._upload_now_and_wait(handle.ino)

    def _sync_size(self, entry: Entry) -> None:
        if entry.fd >= 0 and entry.state == DIRTY:
            st = os.fstat(entry.fd)
            self._tree.dirty_bytes += st.st_size - entry.size
            entry.size, entry.mtime_ns = st.st_size, st.st_mtime_ns

    def release(self, handle: Handle) -> None:
        tree = self._tree
        with tree.lock:
            self._handles.pop(handle.fh, None)
            entry = tree.entries.get(handle.ino)
            if entry is None:
                return
            entry.opens -= 1
            if handle.writable:
                entry.writers -= 1
                self._queue.recount(entry)
                if entry.writers == 0:
                    self._admission.writing.discard(entry.ino)
                if self.write_through and entry.durable_gen == entry.gen \
                        and entry.state == DIRTY and not entry.unlinked:
                    # close() already waited for this generation to reach the store.
                    self._sync_size(entry)
                    if entry.writers == 0:
                        self._queue.mark_clean(entry, entry.size)
                else:
                    entry.gen += 1
                if not entry.unlinked and entry.state == DIRTY:
                    # No journal write: a DIRTY entry is already journaled, and recovery takes
                    # size and mtime from its data file. One commit less per file written.
                    self._sync_size(entry)
                    if entry.writers == 0:
                        self._queue.schedule(entry)
            if entry.opens == 0 and entry.fd >= 0:
                os.close(entry.fd)
                entry.fd = -1
                if entry.unlinked:
                    tree.entries.pop(entry.ino, None)

    @staticmethod
    def fallocate(handle: Handle, mode: int, offset: int, length: int) -> None:
        if mode != 0:
            raise err(errno.EOPNOTSUPP)
        os.posix_fallocate(handle.fd, offset, length)

    def setattr(self, ino: int, *, mode: int | None = None, uid: int | None = None,
                gid: int | None = None, size: int | None = None, atime_ns: int | None = None,
                mtime_ns: int | None = None) -> Attr:
        tree = self._tree
        with tree.lock:
            entry = tree.get(ino)
            needs_fetch = size is not None and size > 0 and not entry.local
        if needs_fetch:
            self._readthrough.fetch(entry)
        if size is not None and not entry.is_dir:
            with tree.lock:
                # Power-loss rule: DIRTY is durable before the truncate, not at the commit
                # of the transaction below (which comes after the file has changed).
                self._queue.mark_dirty(entry)
        with tree.lock, tree.journal.transaction():
            meta_changed = False
            if mode is not None:
                entry.mode = (entry.mode & ~0o7777) | (mode & 0o7777)
                meta_changed = True
            if uid is not None and uid != -1 and uid != 0xFFFFFFFF:
                entry.uid = uid
                meta_changed = True
            if gid is not None and gid != -1 and gid != 0xFFFFFFFF:
                entry.gid = gid
                meta_changed = True
            if size is not None:
                if entry.is_dir:
                    raise err(errno.EISDIR)
                self.truncate(entry, size)
            if mtime_ns is not None:
                entry.mtime_ns = mtime_ns
                if entry.fd >= 0:
                    os.utime(entry.fd, ns=(atime_ns or mtime_ns, mtime_ns))
                meta_changed = True
            entry.ctime_ns = tree.now_ns()
            if meta_changed and not entry.is_dir and entry.state != DIRTY:
                entry.meta_dirty = True
                self._queue.schedule(entry)
            elif meta_changed and entry.state == DIRTY and entry.writers == 0:
                entry.gen += 1
                self._queue.schedule(entry)
            tree.journal.update(entry)
            return tree.attr(entry)

    def truncate(self, entry: Entry, size: int) -> None:
        self._queue.mark_dirty(entry)
        entry.gen += 1
        if entry.fd >= 0:
            os.ftruncate(entry.fd, size)
        else:
            with open(self._files.create_path(entry.ino), "ab") as f:
                f.truncate(size)
            entry.local = True
        self._tree.dirty_bytes += size - entry.size
        entry.size = size
        entry.mtime_ns = self._tree.now_ns()
        if entry.writers == 0:
            self._queue.schedule(entry)

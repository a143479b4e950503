"""``CacheCore``: the one object front ends, the flusher and the daemon talk to.

It builds the core's parts around one ``Tree`` (and its lock) and delegates; the parts hold
the logic. See the package docstring for who holds what.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cistern.cachenode.core.admission import Admission
from cistern.cachenode.core.datafiles import SPARE_FILES, DataFiles
from cistern.cachenode.core.keys import Keys
from cistern.cachenode.core.model import (
    Attr,
    DeleteWork,
    Handle,
    MoveWork,
    StreamWork,
    UploadWork,
    Work,
    err,
)
from cistern.cachenode.core.namespace import Namespace
from cistern.cachenode.core.openfiles import OpenFiles
from cistern.cachenode.core.readthrough import ReadThrough, ReadThroughStore
from cistern.cachenode.core.recovery import recover
from cistern.cachenode.core.replication import NoReplication, Replication
from cistern.cachenode.core.retention import Retention
from cistern.cachenode.core.streams import Streams, StreamState
from cistern.cachenode.core.tree import EventSink, Tree
from cistern.cachenode.core.workqueue import WorkQueue
from cistern.cachenode.journal import DIRTY, Journal
from cistern.config import CacheConfig, DrainPolicy, FlushPolicy

__all__ = ["CacheCore"]


class CacheCore:
    """Thread-safe cache state. Every public method may raise ``OSError`` with an errno."""

    def __init__(self, cache_dir: Path, store: ReadThroughStore, *,
                 flush: FlushPolicy | None = None, cache: CacheConfig | None = None,
                 drain: DrainPolicy | None = None, store_keep_last: int | None = None,
                 on_event: EventSink | None = None,
                 replication: Replication | None = None) -> None:
        self.cache_dir = cache_dir
        self.replication: Replication = replication or NoReplication()
        self.store = store
        self.flush_policy = flush or FlushPolicy()
        self.cache_config = cache or CacheConfig()
        self.drain_policy = drain or DrainPolicy()
        cache_dir.mkdir(parents=True, exist_ok=True)
        self.journal = Journal(cache_dir / "journal.sqlite")
        self._tree = tree = Tree(self.journal,
                                 checkpoint_pattern=self.cache_config.checkpoint_pattern,
                                 is_commit_marker=self.flush_policy.is_commit_marker,
                                 on_event=on_event or (lambda name, value: None))
        self.changed: threading.Condition = tree.changed
        self._data = DataFiles(cache_dir, tree)
        self.data_dir = self._data.data_dir
        self._keys = Keys(tree)
        self._queue = WorkQueue(tree, self._keys, self._data, self.flush_policy)
        self._admission = Admission(cache_dir, tree, self._queue, self.cache_config,
                                    self.drain_policy)
        self._readthrough = ReadThrough(tree, self._keys, self._data, self._queue, store,
                                        self.cache_config.revalidate_after)
        self._files = OpenFiles(tree, self._queue, self._data, self._readthrough,
                                self._admission, self.flush_policy, self.replication)
        self._namespace = Namespace(tree, self._keys, self._queue, self._data,
                                    self._readthrough, self._admission, self._files)
        self._retention = Retention(tree, self._queue, self._data, self._readthrough,
                                    self._namespace, self.cache_config, self.flush_policy,
                                    store_keep_last, self._admission)
        self._streams = Streams(tree, self._keys, self._queue, self._data, self.flush_policy)
        with tree.lock:  # recovery may add tombstones, which notify waiters under the lock
            recover(tree, self._keys, self._queue, self._data)
        self.spares_wanted: threading.Event = self._data.spares_wanted
        """Set when the pool of spare data files runs low (see ``make_spares``)."""
        self.spares_wanted.set()

    # ------------------------------------------------------------------ totals

    @property
    def dirty_bytes(self) -> int:
        return self._tree.dirty_bytes

    @property
    def clean_bytes(self) -> int:
        return self._tree.clean_bytes

    @property
    def capacity_bytes(self) -> int:
        return self._admission.capacity_bytes

    @capacity_bytes.setter
    def capacity_bytes(self, value: int) -> None:
        self._admission.capacity_bytes = value

    @property
    def write_through(self) -> bool:
        return self._files.write_through

    def live_dirty_bytes(self) -> int:
        return self._admission.live_dirty_bytes()

    def entry_count(self) -> int:
        with self._tree.lock:
            return len(self._tree.entries)

    # ------------------------------------------------------------------ namespace

    def lookup(self, parent: int, name: str) -> Attr:
        attr = self._namespace.find(parent, name)
        if attr is None:
            raise err(errno.ENOENT)
        return attr

    def find(self, parent: int, name: str) -> Attr | None:
        """``lookup`` that answers None for a missing name (no exception on the hot path)."""
        return self._namespace.find(parent, name)

    def getattr(self, ino: int) -> Attr:
        with self._tree.lock:
            return self._tree.attr(self._tree.get(ino))

    def forget(self, ino: int, nlookup: int) -> None:
        """Entries live in the journal, not in kernel lookup counts: nothing to drop."""

    def readdir(self, ino: int) -> list[tuple[str, Attr]]:
        return self._namespace.readdir(ino)

    def mkdir(self, parent: int, name: str, mode: int, uid: int, gid: int) -> Attr:
        return self._namespace.mkdir(parent, name, mode, uid, gid)

    def create(self, parent: int, name: str, mode: int, flags: int, uid: int,
               gid: int) -> tuple[Handle, Attr]:
        return self._namespace.create(parent, name, mode, flags, uid, gid)

    def unlink(self, parent: int, name: str) -> None:
        key = self._child_key(parent, name)
        self._namespace.unlink(parent, name)
        if key is not None:
            self.replication.removed(key)

    def rmdir(self, parent: int, name: str) -> None:
        self._namespace.rmdir(parent, name)

    def rename(self, parent_old: int, old: str, parent_new: int, new: str,
               flags: int = 0) -> None:
        old_key = self._child_key(parent_old, old)
        self._namespace.rename(parent_old, old, parent_new, new, flags)
        new_key = self._child_key(parent_new, new)
        if old_key is not None and new_key is not None and old_key != new_key:
            self.replication.renamed(old_key, new_key)  # copies elsewhere follow (issue 17)

    def _child_key(self, parent: int, name: str) -> str | None:
        """The key of ``name`` in ``parent`` (a directory's ends in '/'), None if absent."""
        with self._tree.lock:
            ino = self._tree.child(parent, name)
            entry = self._tree.entries.get(ino) if ino is not None else None
            if entry is None:
                return None
            return self._tree.key_of(entry) + ("/" if entry.is_dir else "")

    # ------------------------------------------------------------------ peers (issue 17)

    def holds_dirty(self, key: str) -> bool:
        """The file at ``key`` is DIRTY here (not in the store in its current version)."""
        with self._tree.lock:
            entry = self._tree.resolve(key)
            return entry is not None and not entry.is_dir and entry.state == DIRTY

    def read_local(self, key: str, offset: int, size: int) -> bytes | None:
        """Bytes of the file at ``key`` if this node has its data (for a peer read)."""
        with self._tree.lock:
            entry = self._tree.resolve(key)
            if entry is None or entry.is_dir or not (entry.local or entry.fd >= 0):
                return None
            path = self._data.path(entry.ino)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            return os.pread(fd, size, offset)
        finally:
            os.close(fd)

    def symlink(self, parent: int, name: str, target: str, uid: int, gid: int) -> Attr:
        raise err(errno.EPERM, "symbolic links cannot be stored in the object store")

    def link(self, ino: int, parent: int, name: str) -> Attr:
        raise err(errno.EPERM, "hard links cannot be stored in the object store")

    def statfs(self) -> os.statvfs_result:
        return os.statvfs(self.cache_dir)

    # Hints for front ends that answer quick requests on the thread that read them: each says
    # whether a call will run without waiting for the object store or for backpressure. A
    # stale answer costs only latency, never correctness.

    def listing_ready(self, ino: int) -> bool:
        """Lookups and creates in directory ``ino`` need no listing from the store."""
        entry = self._tree.entries.get(ino)
        return entry is not None and entry.listed

    def is_local(self, ino: int) -> bool:
        """Opening file ``ino`` needs no fetch from the store."""
        entry = self._tree.entries.get(ino)
        return entry is not None and (entry.local or entry.fd >= 0)

    def admits_now(self) -> bool:
        """A new writer would be admitted at once (no drain hold, below the high watermark)."""
        return self._admission.admits_now()

    # ------------------------------------------------------------------ open files

    def open(self, ino: int, flags: int) -> Handle:
        return self._files.open(ino, flags)

    def read(self, handle: Handle, offset: int, size: int) -> bytes:
        return self._files.read(handle, offset, size)

    def write(self, handle: Handle, offset: int, data: bytes) -> int:
        return self._files.write(handle, offset, data)

    def write_with(self, handle: Handle, offset: int, size: int,
                   copy: Callable[[int, int], int]) -> int:
        """``write`` of ``size`` bytes the caller moves itself with ``copy(fd, offset)``."""
        return self._files.write_with(handle, offset, size, copy)

    def flush(self, handle: Handle) -> None:
        """close(2) on one descriptor (waits for the store only in write-through mode)."""
        self._files.flush(handle)

    def write_may_wait(self, handle: Handle, size: int) -> bool:
        """Hint: ``write(handle, ..., size bytes)`` may wait in admission (backpressure)."""
        return self._files.write_may_wait(handle, size)

    def fsync(self, handle: Handle, datasync: bool = False) -> None:
        self._files.fsync(handle, datasync)

    def sync_namespace(self) -> None:
        """fsync on a directory: every namespace change so far survives a power loss (the
        namespace lives in the journal, so this syncs the journal's WAL)."""
        self.journal.sync()

    def release(self, handle: Handle) -> None:
        self._files.release(handle)

    def fallocate(self, handle: Handle, mode: int, offset: int, length: int) -> None:
        self._files.fallocate(handle, mode, offset, length)

    def setattr(self, ino: int, *, mode: int | None = None, uid: int | None = None,
                gid: int | None = None, size: int | None = None, atime_ns: int | None = None,
                mtime_ns: int | None = None, handle: Handle | None = None) -> Attr:
        return self._files.setattr(ino, mode=mode, uid=uid, gid=gid, size=size,
                                   atime_ns=atime_ns, mtime_ns=mtime_ns)

    # ------------------------------------------------------------------ spares

    def make_spares(self, target: int = SPARE_FILES) -> int:
        """Create empty data files ahead of need (called from the daemon's thread)."""
        return self._data.make_spares(target)

    def on_new_spare(self, hook: Callable[[int, int], None] | None) -> None:
        """Call ``hook(ino, fd)`` for each spare data file made from now on, on the spares
        thread, before a create can take it (``DataFiles.on_spare``)."""
        self._data.on_spare = hook

    def spare_inos(self) -> set[int]:
        """The inode numbers of the spare data files not taken yet."""
        with self._tree.lock:
            return self._data.spare_inos()

    def apply_journal_intents(self) -> int:
        """Move new files' rows from the journal's intent log into SQLite, in one commit
        (called from the daemon's background thread; never takes the core lock)."""
        return self.journal.apply_intents()

    def spare_count(self) -> int:
        with self._tree.lock:
            return self._data.spare_count()

    def data_path(self, ino: int) -> Path:
        """Where file ``ino``'s local data lives (whether or not it is there)."""
        return self._data.path(ino)

    # ------------------------------------------------------------------ housekeeping

    def evict(self, target_bytes: int, reason: str = "capacity") -> int:
        """Drop clean local copies (least recently used first) until usage <= target."""
        return self._retention.evict(target_bytes, reason)

    def maintain(self) -> None:
        """Periodic housekeeping: watermark eviction, cache TTL, checkpoint retention."""
        self._retention.maintain()

    def checkpoints(self, limit: int = 10) -> list[dict[str, Any]]:
        """Recent checkpoint directories and how far each has got."""
        return self._retention.checkpoints(limit)

    # ------------------------------------------------------------------ flusher interface

    def request_flush(self) -> int:
        """Make everything dirty now due immediately; return the sequence to wait for."""
        return self._queue.request_flush()

    def pending_summary(self) -> dict[str, int]:
        return self._queue.pending_summary()

    def idle(self, upto_seq: int | None = None) -> bool:
        """True when nothing (or nothing changed before ``upto_seq``) waits for the store."""
        return self._queue.idle(upto_seq)

    def wait_idle(self, timeout: float, upto_seq: int | None = None) -> bool:
        """Wait until ``idle(upto_seq)``; False if ``timeout`` seconds pass first."""
        return self._queue.wait_idle(timeout, upto_seq)

    def collect_work(self, limit: int, force: bool = False) -> list[Work]:
        """Hand the flusher up to ``limit`` operations that are due and safe to run now."""
        return self._queue.collect_work(limit, force or self._admission.draining)

    def prepare_upload(self, work: UploadWork) -> bool:
        """Before an upload's first request: data and intent made durable (power-loss
        rules); False if the file was opened for writing since (retry later)."""
        return self._queue.prepare_upload(work)

    def upload_source_current(self, work: UploadWork) -> bool:
        """Nobody opened the file for writing since ``work`` was handed out."""
        return self._queue.upload_source_current(work)

    def sync_journal(self) -> None:
        """Make every journaled change durable against power loss (before the flusher
        changes the store for a rename or a delete)."""
        self.journal.sync()

    @property
    def journal_errors(self) -> int:
        """Upload results that could not be journaled (e.g. disk full); they are retried."""
        return self._queue.journal_errors

    def set_upload_id(self, work: UploadWork | StreamWork, upload_id: str) -> None:
        self._queue.set_upload_id(work, upload_id)

    # Streaming uploads of files still being written (core/streams.py).

    def collect_streams(self, limit: int) -> list[StreamWork]:
        """Start up to ``limit`` streams of large files being written at final names."""
        return self._streams.collect(limit)

    def stream_state(self, work: StreamWork, streamed: int) -> StreamState:
        """How far a streamed file has got (``streamed``: bytes its parts hold so far)."""
        return self._streams.state(work, streamed)

    def finish_stream(self, work: StreamWork, gen: int, size: int, etag: str | None,
                      error: Exception | None) -> None:
        """The stream is complete (generation ``gen``, ``size`` bytes) or abandoned."""
        with self._tree.lock:
            if error is not None:
                self._streams.give_back_prediction(work)
            self._queue.finish_upload(Streams.as_upload(work, gen, size), etag, error)

    def finish_upload(self, work: UploadWork, etag: str | None, error: Exception | None) -> None:
        self._queue.finish_upload(work, etag, error)

    def finish_move(self, work: MoveWork, error: Exception | None) -> None:
        self._queue.finish_move(work, error)

    def finish_delete(self, work: DeleteWork, error: Exception | None) -> None:
        self._queue.finish_delete(work, error)

    def finish_stale_uploads(self) -> list[tuple[str, str | None]]:
        """Take the uploads interrupted by the last stop (the flusher aborts them)."""
        return self._queue.take_stale_uploads()

    def return_stale_upload(self, key: str, upload_id: str | None) -> None:
        """An interrupted upload the flusher could not clean up yet."""
        self._queue.return_stale_upload(key, upload_id)

    # ------------------------------------------------------------------ drain and lifecycle

    @property
    def draining(self) -> bool:
        return self._admission.draining

    def set_draining(self, on: bool) -> None:
        self._admission.set_draining(on)

    def close(self) -> None:
        with self._tree.lock:
            self._data.close()
            for entry in self._tree.entries.values():
                if entry.fd >= 0:
                    os.close(entry.fd)
                    entry.fd = -1
            self.journal.close()

    # ------------------------------------------------------------------ introspection

    def debug_entry(self, path: str) -> dict[str, Any] | None:
        with self._tree.lock:
            entry = self._tree.resolve(path)
            if entry is None:
                return None
            return {"ino": entry.ino, "state": entry.state, "remote_key": entry.remote_key,
                    "local": entry.local, "size": entry.size, "in_flight": entry.in_flight}

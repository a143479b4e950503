"""The cache core: namespace, file state machine and local data, with no FUSE and no network.

Front ends (pyfuse3, kernel passthrough) translate kernel requests into calls on ``CacheCore``;
the flusher asks it for work (``collect_work``) and reports results (``finish_*``); the object
store is only touched through the ``ObjectStore`` passed in, for listing and fetching.

State of a file (journaled): DIRTY (local newer than the store), CLEAN (the store has it, a
local copy is cached), REMOTE (only in the store). "Uploading" is DIRTY plus ``in_flight``.

Key ownership (the invariant that makes renames and deletes safe, see docs/dev/cachenode.md):
every object key under the prefix that the cache knows of is owned by exactly one of
  - a live entry whose ``remote_key`` is that key (it will overwrite, move or delete it),
  - a tombstone (the flusher will delete it),
  - an in-flight upload that reserved it.
A file is written to its desired key only when it owns the key or nobody does.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import sqlite3
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cistern.cachenode.journal import CLEAN, DIR, DIRTY, REMOTE, Entry, Journal
from cistern.cachenode.retry import RetryPolicy
from cistern.cachenode.store import ObjectInfo, ObjectStore, StoreError
from cistern.config import CacheConfig, DrainPolicy, FlushPolicy

__all__ = [
    "ROOT_INO",
    "Attr",
    "CacheCore",
    "DeleteWork",
    "Handle",
    "MoveWork",
    "UploadWork",
    "Work",
]

log = logging.getLogger(__name__)

ROOT_INO = 1
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR
NAME_MAX = 255
_ADMIT_EVERY = 16 * 2**20
#: Empty data files kept ready for new files (``make_spares``), so that a create costs a
#: journal insert and no file system create on the request path.
SPARE_FILES = 64
#: Inode numbers reserved in the journal per commit for spare data files.
SPARE_INO_BLOCK = 1024


def _err(code: int, detail: str = "") -> OSError:
    return OSError(code, os.strerror(code) + (f": {detail}" if detail else ""))


@dataclass(frozen=True, slots=True)
class Attr:
    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    size: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    blksize: int = 4096

    @property
    def blocks(self) -> int:
        return (self.size + 511) // 512


@dataclass(slots=True)
class Handle:
    fh: int
    ino: int
    flags: int
    writable: bool
    fd: int
    written: int = 0


@dataclass(frozen=True, slots=True)
class UploadWork:
    ino: int
    key: str
    gen: int
    fd: int
    size: int
    metadata: dict[str, str]
    path: str


@dataclass(frozen=True, slots=True)
class MoveWork:
    ino: int
    src: str
    dst: str
    metadata: dict[str, str] | None


@dataclass(frozen=True, slots=True)
class DeleteWork:
    key: str


Work = UploadWork | MoveWork | DeleteWork


def _check_name(name: str) -> None:
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise _err(errno.EINVAL, repr(name))
    if len(name.encode()) > NAME_MAX:
        raise _err(errno.ENAMETOOLONG, name[:40])


class CacheCore:
    """Thread-safe cache state. Every public method may raise ``OSError`` with an errno."""

    def __init__(self, cache_dir: Path, store: ObjectStore, *,
                 flush: FlushPolicy | None = None, cache: CacheConfig | None = None,
                 drain: DrainPolicy | None = None, store_keep_last: int | None = None,
                 on_event: Callable[[str, float], None] | None = None) -> None:
        self.cache_dir = cache_dir
        self.data_dir = cache_dir / "data"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        (cache_dir / "tmp").mkdir(exist_ok=True)
        self.store = store
        self.flush_policy = flush or FlushPolicy()
        self.cache_config = cache or CacheConfig()
        self.drain_policy = drain or DrainPolicy()
        self.store_keep_last = store_keep_last
        self._on_event = on_event or (lambda name, value: None)
        self.journal = Journal(cache_dir / "journal.sqlite")
        self._lock = threading.RLock()
        self.changed = threading.Condition(self._lock)
        self._entries: dict[int, Entry] = {}
        self._children: dict[int, dict[str, int]] = {}
        self._owners: dict[str, int] = {}
        self._tombstones: set[str] = set()
        self._pending: set[int] = set()
        self._list_retry_at: dict[int, float] = {}
        self._subdirs: dict[int, int] = {}
        self._handles: dict[int, Handle] = {}
        self._fh = itertools.count(1)
        self._seq = itertools.count(1)
        self._force_until_seq = 0
        self._draining = False
        self.stale_uploads: list[tuple[str, str | None]] = []
        self.journal_errors = 0
        """Journal writes that failed in the flusher's reports (e.g. disk full)."""
        self.dirty_bytes = 0
        self.clean_bytes = 0
        self._writing: set[int] = set()
        self.capacity_bytes = self._capacity()
        self._data_root = str(self.data_dir)
        self._shards: set[int] = set()
        self._spares: list[tuple[int, int]] = []
        self._spare_inos: Iterator[int] = iter(())
        self.spares_wanted = threading.Event()
        """Set when the pool of spare data files runs low (see ``make_spares``)."""
        self._closed = False
        with self._lock:  # recovery may add tombstones, which notify waiters under the lock
            self._recover()
        self.spares_wanted.set()

    # ------------------------------------------------------------------ recovery

    def _data_path(self, ino: int) -> Path:
        return self.data_dir / f"{ino % 256:02x}" / str(ino)

    def _data_file(self, ino: int) -> str:
        """The data file's path for creating it: its shard directory is made once, not on
        every call (the create path is hot)."""
        shard = ino % 256
        if shard not in self._shards:
            os.makedirs(f"{self._data_root}/{shard:02x}", exist_ok=True)
            self._shards.add(shard)
        return f"{self._data_root}/{shard:02x}/{ino}"

    def make_spares(self, target: int = SPARE_FILES) -> int:
        """Create empty data files ahead of need, up to ``target``; return how many were made.

        Called from a background thread (the daemon's); the file system creates happen
        outside the lock. A spare's inode number is reserved in the journal first, so no
        entry can ever get it; spares left by a crash have no entry and are removed by
        recovery like any other stray data file.
        """
        made = 0
        self.spares_wanted.clear()
        while True:
            with self._lock:
                if self._closed or len(self._spares) >= target:
                    return made
                ino = next(self._spare_inos, None)
                if ino is None:
                    first = self.journal.reserve_inos(SPARE_INO_BLOCK)
                    self._spare_inos = iter(range(first, first + SPARE_INO_BLOCK))
                    ino = next(self._spare_inos)
            path = self._data_file(ino)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            with self._lock:
                if self._closed:
                    os.close(fd)
                    os.unlink(path)
                    return made
                self._spares.append((ino, fd))
            made += 1

    def _take_spare(self) -> tuple[int, int] | None:
        """A ready (ino, fd) for a new file, or None (the caller creates one inline)."""
        spares = self._spares
        if len(spares) <= SPARE_FILES // 2:
            self.spares_wanted.set()
        return spares.pop() if spares else None

    def _incarnation(self) -> str:
        """Names this boot and this mount of the cache's file system: if a restart sees the
        same one, the page cache survived (a daemon crash, not a power loss)."""
        try:
            boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        except OSError:
            boot = uuid.uuid4().hex  # unknown: assume the worst on the next start
        return f"{boot}:{os.stat(self.cache_dir).st_dev}"

    def _recover(self) -> None:
        """Rebuild the in-memory state from the journal and the data files (see dev note)."""
        now_ns = time.time_ns()
        incarnation = self._incarnation()
        # Power-loss rule: after a daemon crash the page cache still holds every write, so
        # dirty data files are exactly what was written; after a power loss, only what was
        # fsync'd is known to be whole (see docs/dev/cachenode.md, "Power loss").
        page_cache_survived = self.journal.get_meta("incarnation") == incarnation
        entries = self.journal.load()
        if not any(e.ino == ROOT_INO for e in entries):
            root = Entry(ino=ROOT_INO, parent=ROOT_INO, name="", is_dir=True,
                         mode=stat.S_IFDIR | 0o755, uid=os.getuid(), gid=os.getgid(), size=0,
                         mtime_ns=now_ns, ctime_ns=now_ns, state=DIR, local=True, listed=False)
            self.journal.insert(root)
            entries.append(root)
        for entry in entries:
            self._entries[entry.ino] = entry
            self._children.setdefault(entry.ino, {}) if entry.is_dir else None
        for entry in entries:
            if entry.ino != ROOT_INO:
                self._children.setdefault(entry.parent, {})[entry.name] = entry.ino
                if entry.is_dir:
                    self._count_subdir(entry.parent, 1)
            if entry.remote_key:
                self._owners[entry.remote_key] = entry.ino
        self._tombstones = self.journal.tombstones()
        known_data: set[str] = set()
        for entry in entries:
            if entry.is_dir or not entry.local:
                continue
            path = self._data_path(entry.ino)
            try:
                st = path.stat()
            except FileNotFoundError:
                st = None
            if entry.state == DIRTY:
                if st is None:
                    self._lose_local(entry, "dirty data file is missing")
                    continue
                whole = entry.synced and (st.st_size, st.st_mtime_ns) == (entry.size,
                                                                           entry.mtime_ns)
                if not (page_cache_survived or whole) and (entry.remote_key is not None):
                    self._keep_unsynced(entry, path)
                    continue
                entry.size, entry.mtime_ns = st.st_size, st.st_mtime_ns
                if not whole:
                    # Rule: data is durable before it is uploaded (and before it is trusted
                    # after the next crash).
                    fd = os.open(path, os.O_RDONLY)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                    entry.synced = True
                    self.journal.update(entry)
            elif entry.state == CLEAN and (st is None or st.st_size != entry.remote_size):
                log.warning("cached copy of %s is missing or truncated; will fetch again",
                            self.path_of(entry))
                entry.state, entry.local = REMOTE, False
                self.journal.update(entry)
                continue
            known_data.add(str(path))
        for sub in self.data_dir.iterdir():
            for path in sub.iterdir() if sub.is_dir() else ():
                if str(path) not in known_data:
                    path.unlink(missing_ok=True)
        for item in (self.cache_dir / "tmp").iterdir():
            item.unlink(missing_ok=True)
        for intent in self.journal.uploads():
            self._recover_upload(intent.ino, intent.key, intent.upload_id)
        now = time.monotonic()
        for entry in sorted(entries, key=lambda e: e.ino):
            entry.last_access = now
            if not entry.is_dir:
                entry.seq = entry.dirty_seq = next(self._seq)
                if self._needs_work(entry):
                    self._pending.add(entry.ino)
                if entry.state == DIRTY:
                    self.dirty_bytes += entry.size
                elif entry.state == CLEAN:
                    self.clean_bytes += entry.size
        self.journal.set_meta("incarnation", incarnation)
        self.journal.sync()
        if self._pending or self._tombstones or self.stale_uploads:
            log.info("recovered %d entries: %d need upload or move, %d deletes pending, "
                     "%d interrupted uploads to clean up", len(entries), len(self._pending),
                     len(self._tombstones), len(self.stale_uploads))

    def _recover_upload(self, ino: int, key: str, upload_id: str | None) -> None:
        """An upload was in flight when the daemon stopped: the object may or may not exist."""
        self.stale_uploads.append((key, upload_id))
        entry = self._entries.get(ino)
        owner = self._owners.get(key)
        if owner is not None and owner != ino:
            log.error("journal inconsistency: %s owned by %d and uploaded by %d", key, owner, ino)
        elif entry is not None and entry.remote_key is None and not entry.is_dir:
            entry.remote_key = key
            self._owners[key] = ino
            self.journal.update(entry)
        elif entry is None or entry.remote_key != key:
            self._add_tombstone(key)
        self.journal.remove_upload(ino, key)

    def _keep_unsynced(self, entry: Entry, path: Path) -> None:
        """Power loss hit a file that has an object in the store while it held changes
        nobody fsync'd: what the disk holds may be torn (an O_TRUNC without its new data, a
        write half on disk). Rule: a crash state never replaces a good object, so the path
        shows the store's version again and the local data is kept aside, loudly."""
        lost = self.cache_dir / "lost+found"
        lost.mkdir(exist_ok=True)
        kept = lost / f"{entry.ino}-{entry.name}"
        os.replace(path, kept)
        log.error("power loss: %s had changes that were never fsync'd; it shows the object "
                  "store's version again, the data found on disk is kept in %s",
                  self.path_of(entry), kept)
        self._on_event("unsynced_kept", 1)
        entry.state, entry.local, entry.synced = REMOTE, False, False
        if entry.remote_size is not None:
            entry.size = entry.remote_size
        self.journal.update(entry)

    def _lose_local(self, entry: Entry, why: str) -> None:
        log.error("DATA LOSS: %s: %s", self.path_of(entry), why)
        self._on_event("data_loss", 1)
        if entry.remote_key:
            entry.state, entry.local = REMOTE, False
            self.journal.update(entry)
        else:
            self._children.get(entry.parent, {}).pop(entry.name, None)
            del self._entries[entry.ino]
            self.journal.delete(entry.ino)

    # ------------------------------------------------------------------ helpers

    def _get(self, ino: int) -> Entry:
        entry = self._entries.get(ino)
        if entry is None:
            raise _err(errno.ENOENT, f"inode {ino}")
        return entry

    def _dir(self, ino: int) -> Entry:
        entry = self._get(ino)
        if not entry.is_dir:
            raise _err(errno.ENOTDIR)
        return entry

    def path_of(self, entry: Entry) -> str:
        parts: list[str] = []
        while entry.ino != ROOT_INO:
            parts.append(entry.name)
            parent = self._entries.get(entry.parent)
            if parent is None:
                break
            entry = parent
        return "/".join(reversed(parts))

    def key_of(self, entry: Entry) -> str:
        return self.path_of(entry)

    def _resolve(self, key: str) -> Entry | None:
        ino = ROOT_INO
        for part in key.split("/"):
            child = self._children.get(ino, {}).get(part)
            if child is None:
                return None
            ino = child
        return self._entries.get(ino)

    def _attr(self, entry: Entry) -> Attr:
        size, mtime = entry.size, entry.mtime_ns
        if entry.writers and entry.fd >= 0:
            st = os.fstat(entry.fd)
            size, mtime = st.st_size, st.st_mtime_ns
        nlink = 2 + self._subdirs.get(entry.ino, 0) if entry.is_dir else 1
        return Attr(ino=entry.ino, mode=entry.mode, nlink=nlink, uid=entry.uid, gid=entry.gid,
                    size=size, atime_ns=mtime, mtime_ns=mtime, ctime_ns=entry.ctime_ns)

    def _needs_work(self, entry: Entry) -> bool:
        if entry.is_dir or entry.unlinked:
            return False
        if entry.state == DIRTY or entry.meta_dirty:
            return True
        return entry.remote_key is not None and entry.remote_key != self.key_of(entry)

    def _schedule(self, entry: Entry, delay: float | None = None, bump: bool = True) -> None:
        if self._needs_work(entry):
            entry.due = time.monotonic() + (self.flush_policy.upload_delay
                                            if delay is None else delay)
            if bump:
                entry.seq = next(self._seq)
            self._add_pending(entry)
            self.changed.notify_all()

    def _add_pending(self, entry: Entry) -> None:
        """``dirty_seq`` marks when the entry started to need work: a flush requested after
        that point must wait for it, whatever happens to the entry afterwards."""
        if entry.ino not in self._pending:
            entry.dirty_seq = next(self._seq)
            self._pending.add(entry.ino)

    def _add_tombstone(self, key: str) -> None:
        self._tombstones.add(key)
        self.journal.add_tombstone(key)
        self.changed.notify_all()

    def _release_key(self, key: str) -> None:
        """``key`` lost its owner: hand it to the entry that now wants it, or delete it."""
        self._owners.pop(key, None)
        wanting = self._resolve(key)
        if wanting is not None and not wanting.is_dir and wanting.remote_key is None:
            wanting.remote_key = key
            self._owners[key] = wanting.ino
            self.journal.update(wanting)
        else:
            self._add_tombstone(key)

    def _claim_tombstone(self, entry: Entry) -> None:
        """A new or renamed file landed on a key scheduled for deletion: overwrite it instead."""
        key = self.key_of(entry)
        if entry.remote_key is None and key in self._tombstones:
            self._tombstones.discard(key)
            self.journal.remove_tombstone(key)
            entry.remote_key = key
            self._owners[key] = entry.ino

    def _now_ns(self) -> int:
        return time.time_ns()

    # ------------------------------------------------------------------ listing (read-through)

    def _ensure_listed(self, entry: Entry) -> None:
        """Import the store's view of a directory the first time it is looked at."""
        if entry.listed or time.monotonic() < self._list_retry_at.get(entry.ino, 0.0):
            return
        prefix = self.key_of(entry)
        prefix = f"{prefix}/" if prefix else ""
        try:
            # Throttling and blips are retried briefly (a restarted job must not get ENOENT
            # for its checkpoint because of one 503), but an outage must not block writers.
            files, dirs = RetryPolicy(deadline=5.0).call(
                f"list {prefix or '/'}", lambda: self.store.list_dir(prefix),
                on_error=lambda exc: self._on_event(f"store_error:{exc.code}", 1))
        except StoreError as exc:
            # Writers must not fail because the store is down: serve what is known locally
            # and list again later. The local entries win over the store's when it returns.
            self._list_retry_at[entry.ino] = time.monotonic() + 15.0
            log.warning("cannot list %s/ in the object store (%s); showing local entries "
                        "only for now", prefix.rstrip("/") or "", exc)
            return
        self._list_retry_at.pop(entry.ino, None)
        with self._lock, self.journal.transaction():
            if entry.listed:
                return
            children = self._children.setdefault(entry.ino, {})
            for sub in dirs:
                name = sub[len(prefix):].rstrip("/")
                if name and "/" not in name and name not in children:
                    self._import(entry, name, None)
            for info in files:
                name = info.key[len(prefix):]
                if name and "/" not in name and name not in children \
                        and info.key not in self._tombstones and info.key not in self._owners:
                    self._import(entry, name, info)
            entry.listed = True
            self.journal.update(entry)

    def _import(self, parent: Entry, name: str, info: ObjectInfo | None) -> Entry:
        if info is None:
            mtime = parent.mtime_ns
            new = Entry(ino=0, parent=parent.ino, name=name, is_dir=True,
                        mode=stat.S_IFDIR | 0o755, uid=parent.uid, gid=parent.gid, size=0,
                        mtime_ns=mtime, ctime_ns=mtime, state=DIR, local=False, listed=False)
        else:
            mtime = int(info.mtime * 1e9)
            new = Entry(ino=0, parent=parent.ino, name=name, is_dir=False,
                        mode=stat.S_IFREG | 0o644, uid=parent.uid, gid=parent.gid,
                        size=info.size, mtime_ns=mtime, ctime_ns=mtime, state=REMOTE,
                        local=False, remote_key=info.key, remote_size=info.size)
        new.ino = self.journal.insert(new)
        self._entries[new.ino] = new
        self._children[parent.ino][name] = new.ino
        if new.is_dir:
            self._children[new.ino] = {}
            self._count_subdir(parent.ino, 1)
        if new.remote_key:
            self._owners[new.remote_key] = new.ino
        return new

    def _ensure_subtree_listed(self, entry: Entry) -> None:
        """Before a directory rename or removal: know every object below it."""
        if not entry.is_dir:
            return
        self._ensure_listed(entry)
        with self._lock:
            subdirs = [self._entries[c] for c in self._children.get(entry.ino, {}).values()
                       if self._entries[c].is_dir]
        for sub in subdirs:
            self._ensure_subtree_listed(sub)

    # ------------------------------------------------------------------ namespace

    def lookup(self, parent: int, name: str) -> Attr:
        attr = self.find(parent, name)
        if attr is None:
            raise _err(errno.ENOENT)
        return attr

    def find(self, parent: int, name: str) -> Attr | None:
        """``lookup`` that answers None for a missing name (no exception on the hot path)."""
        with self._lock:
            directory = self._dir(parent)
        self._ensure_listed(directory)
        with self._lock:
            if name == ".":
                return self._attr(directory)
            if name == "..":
                return self._attr(self._get(directory.parent))
            ino = self._children.get(parent, {}).get(name)
            return None if ino is None else self._attr(self._entries[ino])

    # Hints for front ends that answer quick requests on the thread that read them: each says
    # whether a call will run without waiting for the object store or for backpressure. A
    # stale answer costs only latency, never correctness.

    def listing_ready(self, ino: int) -> bool:
        """Lookups and creates in directory ``ino`` need no listing from the store."""
        entry = self._entries.get(ino)
        return entry is not None and entry.listed

    def is_local(self, ino: int) -> bool:
        """Opening file ``ino`` needs no fetch from the store."""
        entry = self._entries.get(ino)
        return entry is not None and (entry.local or entry.fd >= 0)

    def admits_now(self) -> bool:
        """A new writer would be admitted at once (no drain hold, below the high watermark)."""
        return not self._draining and self.live_dirty_bytes() < self._soft_limit()

    def _soft_limit(self) -> float:
        """Dirty bytes above which new writers are slowed (the high watermark)."""
        return self.capacity_bytes * self.cache_config.high_watermark

    def getattr(self, ino: int) -> Attr:
        with self._lock:
            return self._attr(self._get(ino))

    def forget(self, ino: int, nlookup: int) -> None:
        """Entries live in the journal, not in kernel lookup counts: nothing to drop."""

    def readdir(self, ino: int) -> list[tuple[str, Attr]]:
        with self._lock:
            directory = self._dir(ino)
        self._ensure_listed(directory)
        with self._lock:
            children = self._children.get(ino, {})
            return [(name, self._attr(self._entries[c])) for name, c in sorted(children.items())]

    def _new_entry(self, parent: Entry, name: str, *, is_dir: bool, mode: int, uid: int,
                   gid: int) -> Entry:
        _check_name(name)
        if name in self._children.get(parent.ino, {}):
            raise _err(errno.EEXIST)
        now = self._now_ns()
        kind = stat.S_IFDIR if is_dir else stat.S_IFREG
        entry = Entry(ino=0, parent=parent.ino, name=name, is_dir=is_dir,
                      mode=kind | (mode & 0o7777), uid=uid, gid=gid, size=0, mtime_ns=now,
                      ctime_ns=now, state=DIR if is_dir else DIRTY, local=True, listed=True)
        return entry

    def mkdir(self, parent: int, name: str, mode: int, uid: int, gid: int) -> Attr:
        with self._lock:
            directory = self._dir(parent)
        self._ensure_listed(directory)
        with self._lock, self.journal.transaction():
            entry = self._new_entry(directory, name, is_dir=True, mode=mode, uid=uid, gid=gid)
            entry.ino = self.journal.insert(entry)
            self._entries[entry.ino] = entry
            self._children[entry.ino] = {}
            self._children[parent][name] = entry.ino
            self._count_subdir(parent, 1)
            self._touch_dir(directory)
            return self._attr(entry)

    def _count_subdir(self, parent: int, delta: int) -> None:
        """Keep each directory's count of subdirectories (its nlink - 2) without scans."""
        self._subdirs[parent] = self._subdirs.get(parent, 0) + delta

    def _touch_dir(self, directory: Entry) -> None:
        directory.mtime_ns = directory.ctime_ns = self._now_ns()

    def create(self, parent: int, name: str, mode: int, flags: int, uid: int,
               gid: int) -> tuple[Handle, Attr]:
        with self._lock:
            directory = self._dir(parent)
        self._ensure_listed(directory)
        self._admit(new_file=True)
        with self._lock:
            entry = self._new_entry(directory, name, is_dir=False, mode=mode, uid=uid, gid=gid)
            spare = self._take_spare()
            if spare is not None:
                entry.ino, entry.fd = spare
                try:
                    self.journal.insert(entry)
                except BaseException:
                    self._spares.append(spare)
                    raise
            else:
                entry.ino = self.journal.insert(entry)
                try:
                    entry.fd = os.open(self._data_file(entry.ino),
                                       os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
                except OSError:
                    self.journal.delete(entry.ino)
                    raise
            self._entries[entry.ino] = entry
            self._children[parent][name] = entry.ino
            self._claim_tombstone(entry)
            if entry.remote_key:
                self.journal.update(entry)
            self._touch_dir(directory)
            handle = self._open_handle(entry, flags | os.O_RDWR, writable=True)
            return handle, self._attr(entry)

    # ------------------------------------------------------------------ capacity

    def _capacity(self) -> int:
        st = os.statvfs(self.cache_dir)
        size = st.f_blocks * st.f_frsize
        if self.cache_config.capacity_bytes is not None:
            if self.cache_config.capacity_bytes > size:
                # Backpressure would never engage before the disk is full: writers would get
                # ENOSPC from the file system instead of being slowed.
                raise _err(errno.EINVAL, f"cache.capacityBytes {self.cache_config.capacity_bytes}"
                           f" is larger than the file system of {self.cache_dir} ({size} bytes)")
            return self.cache_config.capacity_bytes
        return int(size * self.cache_config.capacity_percent / 100)

    def live_dirty_bytes(self) -> int:
        """Dirty bytes including what open writers added since their last sync."""
        with self._lock:
            grown = 0
            for ino in self._writing:
                entry = self._entries.get(ino)
                if entry is not None and entry.fd >= 0:
                    grown += max(0, os.fstat(entry.fd).st_size - entry.size)
            return self.dirty_bytes + grown

    def _wait_for_drain_end(self) -> None:
        """``drain.newWrites: hold``: new writers wait while the node drains."""
        while self._draining and self.drain_policy.new_writes == "hold":
            self.changed.wait(1.0)

    def _admit(self, *, new_file: bool) -> None:
        """Backpressure: slow writers above the high watermark of dirty data, block them at
        capacity until the flusher frees space, and refuse new files (ENOSPC) when nothing
        frees up within ``admissionTimeout``. Existing files are never failed mid-write here.
        """
        if self._draining:
            if self.drain_policy.new_writes == "reject":
                raise _err(errno.EROFS, "the cache is draining")
            with self._lock:
                self._wait_for_drain_end()
        cap = self.capacity_bytes
        soft = self._soft_limit()
        dirty = self.live_dirty_bytes()
        if dirty < soft:
            return
        started = time.monotonic()
        deadline = started + self.cache_config.admission_timeout
        if dirty < cap:
            # Slow down in proportion to how far into the band between soft and hard we are.
            time.sleep(min(0.2, 0.2 * (dirty - soft) / max(1.0, cap - soft)))
        else:
            log.warning("cache full: %d dirty bytes of %d; holding a writer until the flusher "
                        "frees space", dirty, cap)
            with self._lock:
                self._force_until_seq = next(self._seq)
                self.changed.notify_all()
                while self.live_dirty_bytes() >= cap:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        self._on_event("backpressure_seconds", time.monotonic() - started)
                        if new_file:
                            self._on_event("admission_refused", 1)
                            log.error("refusing a new file: the cache holds %d dirty bytes "
                                      "(capacity %d) and nothing was freed in %.0fs",
                                      self.dirty_bytes, cap, self.cache_config.admission_timeout)
                            raise _err(errno.ENOSPC, "the write cache is full of data not yet "
                                       "in the object store")
                        return
                    self.changed.wait(min(left, 0.5))
        self._on_event("backpressure_seconds", time.monotonic() - started)

    def evict(self, target_bytes: int, reason: str = "capacity") -> int:
        """Drop clean local copies (least recently used first) until usage <= target."""
        freed = 0
        with self._lock:
            if self.dirty_bytes + self.clean_bytes <= target_bytes:
                return 0
            candidates = sorted((e for e in self._entries.values()
                                 if e.state == CLEAN and e.local and e.opens == 0
                                 and not e.in_flight and e.ino not in self._pending),
                                key=lambda e: e.last_access)
            for entry in candidates:
                if self.dirty_bytes + self.clean_bytes <= target_bytes:
                    break
                freed += self._drop_local(entry, reason)
        return freed

    def _drop_local(self, entry: Entry, reason: str) -> int:
        self._data_path(entry.ino).unlink(missing_ok=True)
        entry.local = False
        entry.state = REMOTE
        self.clean_bytes -= entry.size
        self.journal.update(entry)
        self._on_event(f"evicted:{reason}", entry.size)
        return entry.size

    def maintain(self) -> None:
        """Periodic housekeeping: watermark eviction, cache TTL, checkpoint retention."""
        cfg = self.cache_config
        if self.dirty_bytes + self.clean_bytes > self.capacity_bytes * cfg.high_watermark:
            freed = self.evict(int(self.capacity_bytes * cfg.low_watermark))
            if freed:
                log.info("evicted %d clean bytes (above the high watermark)", freed)
        if cfg.cache_ttl is not None:
            cutoff = time.monotonic() - cfg.cache_ttl
            with self._lock:
                for entry in list(self._entries.values()):
                    if entry.state == CLEAN and entry.local and entry.opens == 0 \
                            and entry.last_access < cutoff and entry.ino not in self._pending:
                        self._drop_local(entry, "ttl")
        if cfg.keep_last_checkpoints is not None:
            self._retain_in_cache(cfg.keep_last_checkpoints)
        if self.store_keep_last is not None:
            self._retain_in_store(self.store_keep_last)

    # ------------------------------------------------------------------ retention

    def _checkpoint_groups(self) -> list[list[Entry]]:
        """Checkpoint directories (name matches checkpointPattern) grouped by parent, oldest
        first: by name with numbers compared as numbers, then by mtime."""
        import fnmatch
        import re

        def natural(entry: Entry) -> tuple[object, ...]:
            parts = re.split(r"(\d+)", entry.name)
            return (tuple(int(p) if p.isdigit() else p for p in parts), entry.mtime_ns)

        pattern = self.cache_config.checkpoint_pattern
        groups: dict[int, list[Entry]] = {}
        with self._lock:
            for entry in self._entries.values():
                if entry.is_dir and entry.ino != ROOT_INO \
                        and fnmatch.fnmatchcase(entry.name, pattern):
                    groups.setdefault(entry.parent, []).append(entry)
        return [sorted(group, key=natural) for group in groups.values()]

    def _subtree_settled(self, directory: Entry) -> bool:
        """Every file below is in the store under its final key and nothing is open."""
        return all(e.ino not in self._pending and not e.in_flight and e.opens == 0
                   for e in self._walk(directory))

    def _retain_in_cache(self, keep: int) -> None:
        for group in self._checkpoint_groups():
            for directory in group[:-keep] if len(group) > keep else []:
                with self._lock:
                    if directory.ino not in self._entries or not self._subtree_settled(directory):
                        continue
                    dropped = [self._drop_local(e, "retention") for e in self._walk(directory)
                               if e.state == CLEAN and e.local]
                if dropped:
                    log.info("retention: dropped the cached copy of %s (%d bytes)",
                             self.path_of(directory), sum(dropped))
                    self._on_event("retention:cache", 1)

    def _retain_in_store(self, keep: int) -> None:
        for group in self._checkpoint_groups():
            for directory in group[:-keep] if len(group) > keep else []:
                self._ensure_subtree_listed(directory)
                with self._lock, self.journal.transaction():
                    if directory.ino not in self._entries or not self._subtree_settled(directory):
                        continue
                    path = self.path_of(directory)
                    self._remove_tree(directory)
                log.info("retention: deleting %s from the object store (store.keepLastCheckpoints"
                         "=%d)", path, keep)
                self._on_event("retention:store", 1)

    def _remove_tree(self, directory: Entry) -> None:
        for child in list(self._children.get(directory.ino, {}).values()):
            entry = self._entries[child]
            if entry.is_dir:
                self._remove_tree(entry)
            else:
                self._remove(entry)
        del self._children[directory.parent][directory.name]
        del self._children[directory.ino]
        self._count_subdir(directory.parent, -1)
        del self._entries[directory.ino]
        self.journal.delete(directory.ino)

    def checkpoints(self, limit: int = 10) -> list[dict[str, Any]]:
        """Recent checkpoint directories and how far each has got."""
        out: list[dict[str, Any]] = []
        with self._lock:
            dirs = [d for group in self._checkpoint_groups() for d in group]
            for entry in self._entries.values():
                if not entry.is_dir and self.flush_policy.is_commit_marker(entry.name):
                    parent = self._entries.get(entry.parent)
                    if parent is not None and parent not in dirs:
                        dirs.append(parent)
            dirs.sort(key=lambda d: d.mtime_ns)
            for directory in dirs[-limit:]:
                files = list(self._walk(directory))
                markers = [f for f in files if self.flush_policy.is_commit_marker(f.name)]
                pending = [f for f in files if f.ino in self._pending or f.in_flight]
                if not markers:
                    state = "writing"
                elif pending:
                    state = "committed-locally"
                else:
                    state = "durable"
                out.append({"path": self.path_of(directory) or "/", "state": state,
                            "files": len(files), "bytes": sum(f.size for f in files),
                            "pending_files": len(pending)})
        return out

    def _open_handle(self, entry: Entry, flags: int, writable: bool) -> Handle:
        if writable:
            if entry.writers == 0 or entry.state != DIRTY or entry.synced:
                self._mark_dirty(entry)
            entry.writers += 1
            entry.gen += 1
            self._writing.add(entry.ino)
        if entry.opens == 0 and entry.state == CLEAN:
            self._on_event("hit_bytes", entry.size)
        entry.opens += 1
        entry.last_access = time.monotonic()
        handle = Handle(fh=next(self._fh), ino=entry.ino, flags=flags, writable=writable,
                        fd=entry.fd)
        self._handles[handle.fh] = handle
        return handle

    def _mark_dirty(self, entry: Entry) -> None:
        """Journal DIRTY before the first byte changes, so a crash can never hide a write.

        Power-loss rule: if the file has an object in the store (or an upload that may make
        one), the change from CLEAN, or from "synced", is durable before the modifying
        operation is acknowledged; recovery then never takes a torn file for a whole one.
        """
        changed = entry.state != DIRTY or entry.synced
        if entry.state != DIRTY:
            if entry.state == CLEAN:
                self.clean_bytes -= entry.size
            entry.state = DIRTY
            self.dirty_bytes += entry.size
        entry.synced = False
        if changed:
            self.journal.update(entry)
            if entry.remote_key is not None or entry.in_flight:
                self.journal.sync()
        self._add_pending(entry)
        entry.due = float("inf")

    def open(self, ino: int, flags: int) -> Handle:
        writable = bool(flags & _WRITE_FLAGS)
        truncate = bool(flags & os.O_TRUNC) and writable
        with self._lock:
            entry = self._get(ino)
            if entry.is_dir:
                raise _err(errno.EISDIR)
        if writable:
            self._admit(new_file=False)
        while True:
            with self._lock:
                if entry.unlinked:
                    raise _err(errno.ENOENT)
                # Re-checked under the lock: eviction may have dropped a copy fetched a
                # moment ago, and an empty data file must never stand in for the object.
                if entry.local or truncate or entry.fd >= 0:
                    if entry.fd < 0:
                        entry.fd = os.open(self._data_file(ino), os.O_RDWR | os.O_CREAT, 0o600)
                        entry.local = True
                    handle = self._open_handle(entry, flags, writable)
                    if truncate:
                        self._truncate(entry, 0)
                    return handle
            self._fetch(entry)

    def _fetch(self, entry: Entry) -> None:
        """Read-through: copy a REMOTE file into the cache (serialised per file)."""
        with self._lock:
            while entry.in_flight and not entry.local:
                self.changed.wait(1.0)
            if entry.local:
                return
            key = entry.remote_key
            if key is None:
                raise _err(errno.EIO, f"{self.path_of(entry)} has neither data nor object")
            entry.in_flight = True
        tmp = self.cache_dir / "tmp" / f"fetch-{entry.ino}-{threading.get_ident()}"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            try:
                info = self._fetch_retrying(key, fd)
            except FileNotFoundError as exc:
                raise _err(errno.ENOENT, f"{key} vanished from the object store") from exc
            except StoreError as exc:
                log.error("fetch %s failed: %s", key, exc)
                raise _err(errno.EIO, str(exc)) from exc
            os.fsync(fd)
            with self._lock:
                os.replace(tmp, self._data_file(entry.ino))
                # Rule: a CLEAN row is never durable before its data file is.
                self._sync_dir(self._data_path(entry.ino).parent)
                entry.local = True
                entry.state = CLEAN
                entry.last_access = time.monotonic()
                entry.size = entry.remote_size = info.size
                self._apply_metadata(entry, info.metadata)
                self.clean_bytes += info.size
                self.journal.update(entry)
                self._on_event("fetched_bytes", info.size)
        finally:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            with self._lock:
                entry.in_flight = False
                self.changed.notify_all()

    def _fetch_retrying(self, key: str, fd: int) -> ObjectInfo:
        return RetryPolicy(deadline=60.0).call(f"fetch {key}", lambda: self.store.download(key, fd))

    @staticmethod
    def _apply_metadata(entry: Entry, metadata: dict[str, str]) -> None:
        try:
            if "mode" in metadata:
                entry.mode = stat.S_IFREG | (int(metadata["mode"], 8) & 0o7777)
            if "uid" in metadata:
                entry.uid = int(metadata["uid"])
            if "gid" in metadata:
                entry.gid = int(metadata["gid"])
            if "mtime-ns" in metadata:
                entry.mtime_ns = int(metadata["mtime-ns"])
        except ValueError:
            log.warning("ignoring malformed object metadata %r", metadata)

    def read(self, handle: Handle, offset: int, size: int) -> bytes:
        return os.pread(handle.fd, size, offset)

    def write(self, handle: Handle, offset: int, data: bytes) -> int:
        if not handle.writable:
            raise _err(errno.EBADF)
        if handle.flags & os.O_APPEND:
            offset = os.fstat(handle.fd).st_size
        handle.written += len(data)
        if handle.written >= _ADMIT_EVERY:
            handle.written = 0
            self._admit(new_file=False)
        return os.pwrite(handle.fd, data, offset)

    @property
    def write_through(self) -> bool:
        return self.flush_policy.mode == "writeThrough"

    def flush(self, handle: Handle) -> None:
        """close(2) on one descriptor: nothing to wait for in write-back mode; in write-through
        mode, upload what the file holds now and return when the store has it."""
        if self.write_through and handle.writable:
            self._upload_now_and_wait(handle.ino)

    def _upload_now_and_wait(self, ino: int) -> None:
        with self._lock:
            entry = self._entries.get(ino)
            if entry is None or entry.unlinked or entry.state != DIRTY:
                return
            entry.gen += 1
            target = entry.sync_wanted = entry.gen
            entry.due = 0.0
            self._add_pending(entry)
            self.changed.notify_all()
            deadline = time.monotonic() + 600.0
            while entry.durable_gen < target and not entry.unlinked:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise _err(errno.EIO, "write-through: the object store did not take the "
                               "file in time (it stays dirty and will be retried)")
                self.changed.wait(min(left, 0.5))

    def fsync(self, handle: Handle, datasync: bool = False) -> None:
        # Always a full fsync, even for fdatasync: the "synced" mark below records the data
        # file's mtime, which recovery compares after a power loss.
        os.fsync(handle.fd)
        with self._lock:
            entry = self._entries.get(handle.ino)
            if entry is not None and not entry.unlinked:
                self._sync_size(entry)
                entry.synced = entry.state == DIRTY
                self.journal.update(entry)
        self._sync_dir(self._data_path(handle.ino).parent)
        self.journal.sync()
        if self.write_through and handle.writable:
            self._upload_now_and_wait(handle.ino)

    @staticmethod
    def _sync_dir(path: Path) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _sync_size(self, entry: Entry) -> None:
        if entry.fd >= 0 and entry.state == DIRTY:
            st = os.fstat(entry.fd)
            self.dirty_bytes += st.st_size - entry.size
            entry.size, entry.mtime_ns = st.st_size, st.st_mtime_ns

    def release(self, handle: Handle) -> None:
        with self._lock:
            self._handles.pop(handle.fh, None)
            entry = self._entries.get(handle.ino)
            if entry is None:
                return
            entry.opens -= 1
            if handle.writable:
                entry.writers -= 1
                if entry.writers == 0:
                    self._writing.discard(entry.ino)
                if self.write_through and entry.durable_gen == entry.gen \
                        and entry.state == DIRTY and not entry.unlinked:
                    # close() already waited for this generation to reach the store.
                    self._sync_size(entry)
                    if entry.writers == 0:
                        self._mark_clean(entry, entry.size)
                else:
                    entry.gen += 1
                if not entry.unlinked and entry.state == DIRTY:
                    # No journal write: a DIRTY entry is already journaled, and recovery takes
                    # size and mtime from its data file. One commit less per file written.
                    self._sync_size(entry)
                    if entry.writers == 0:
                        self._schedule(entry)
            if entry.opens == 0 and entry.fd >= 0:
                os.close(entry.fd)
                entry.fd = -1
                if entry.unlinked:
                    self._entries.pop(entry.ino, None)

    def fallocate(self, handle: Handle, mode: int, offset: int, length: int) -> None:
        if mode != 0:
            raise _err(errno.EOPNOTSUPP)
        os.posix_fallocate(handle.fd, offset, length)

    def setattr(self, ino: int, *, mode: int | None = None, uid: int | None = None,
                gid: int | None = None, size: int | None = None, atime_ns: int | None = None,
                mtime_ns: int | None = None, handle: Handle | None = None) -> Attr:
        with self._lock:
            entry = self._get(ino)
            needs_fetch = size is not None and size > 0 and not entry.local
        if needs_fetch:
            self._fetch(entry)
        if size is not None and not entry.is_dir:
            with self._lock:
                # Power-loss rule: DIRTY is durable before the truncate, not at the commit
                # of the transaction below (which comes after the file has changed).
                self._mark_dirty(entry)
        with self._lock, self.journal.transaction():
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
                    raise _err(errno.EISDIR)
                self._truncate(entry, size)
            if mtime_ns is not None:
                entry.mtime_ns = mtime_ns
                if entry.fd >= 0:
                    os.utime(entry.fd, ns=(atime_ns or mtime_ns, mtime_ns))
                meta_changed = True
            entry.ctime_ns = self._now_ns()
            if meta_changed and not entry.is_dir and entry.state != DIRTY:
                entry.meta_dirty = True
                self._schedule(entry)
            elif meta_changed and entry.state == DIRTY and entry.writers == 0:
                entry.gen += 1
                self._schedule(entry)
            self.journal.update(entry)
            return self._attr(entry)

    def _truncate(self, entry: Entry, size: int) -> None:
        self._mark_dirty(entry)
        entry.gen += 1
        if entry.fd >= 0:
            os.ftruncate(entry.fd, size)
        else:
            with open(self._data_file(entry.ino), "ab") as f:
                f.truncate(size)
            entry.local = True
        self.dirty_bytes += size - entry.size
        entry.size = size
        entry.mtime_ns = self._now_ns()
        if entry.writers == 0:
            self._schedule(entry)

    def unlink(self, parent: int, name: str) -> None:
        with self._lock:
            directory = self._dir(parent)
        self._ensure_listed(directory)
        with self._lock, self.journal.transaction():
            ino = self._children.get(parent, {}).get(name)
            if ino is None:
                raise _err(errno.ENOENT)
            entry = self._entries[ino]
            if entry.is_dir:
                raise _err(errno.EISDIR)
            self._remove(entry)
            self._touch_dir(directory)

    def _remove(self, entry: Entry) -> None:
        del self._children[entry.parent][entry.name]
        self._pending.discard(entry.ino)
        if entry.state == DIRTY:
            self.dirty_bytes -= entry.size
        elif entry.state == CLEAN:
            self.clean_bytes -= entry.size
        if entry.remote_key is not None and not entry.in_flight:
            self._release_key(entry.remote_key)
        entry.unlinked = True
        self.journal.delete(entry.ino)
        if entry.local:
            self._data_path(entry.ino).unlink(missing_ok=True)
        if entry.opens == 0 and not entry.in_flight:
            self._entries.pop(entry.ino, None)
        self.changed.notify_all()

    def rmdir(self, parent: int, name: str) -> None:
        with self._lock:
            directory = self._dir(parent)
            ino = self._children.get(parent, {}).get(name)
            if ino is None:
                raise _err(errno.ENOENT)
            target = self._entries[ino]
            if not target.is_dir:
                raise _err(errno.ENOTDIR)
        self._ensure_listed(target)
        with self._lock, self.journal.transaction():
            if self._children.get(ino):
                raise _err(errno.ENOTEMPTY)
            del self._children[parent][name]
            del self._children[ino]
            self._count_subdir(parent, -1)
            del self._entries[ino]
            self.journal.delete(ino)
            self._touch_dir(directory)

    def rename(self, parent_old: int, old: str, parent_new: int, new: str,
               flags: int = 0) -> None:
        if flags & RENAME_EXCHANGE or flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE):
            raise _err(errno.EINVAL, "RENAME_EXCHANGE is not supported")
        _check_name(new)
        with self._lock:
            src_dir, dst_dir = self._dir(parent_old), self._dir(parent_new)
        self._ensure_listed(src_dir)
        self._ensure_listed(dst_dir)
        with self._lock:
            ino = self._children.get(parent_old, {}).get(old)
            if ino is None:
                raise _err(errno.ENOENT)
            moving = self._entries[ino]
        if moving.is_dir:
            self._ensure_subtree_listed(moving)
        with self._lock, self.journal.transaction():
            ino = self._children.get(parent_old, {}).get(old)
            if ino is None or ino != moving.ino:
                raise _err(errno.ENOENT)
            if parent_old == parent_new and old == new:
                return
            if moving.is_dir:
                ancestor = dst_dir
                while True:
                    if ancestor.ino == moving.ino:
                        raise _err(errno.EINVAL, "cannot move a directory into itself")
                    if ancestor.ino == ROOT_INO:
                        break
                    ancestor = self._entries[ancestor.parent]
            existing_ino = self._children.get(parent_new, {}).get(new)
            if existing_ino is not None:
                if flags & RENAME_NOREPLACE:
                    raise _err(errno.EEXIST)
                existing = self._entries[existing_ino]
                if existing.is_dir and not moving.is_dir:
                    raise _err(errno.EISDIR)
                if not existing.is_dir and moving.is_dir:
                    raise _err(errno.ENOTDIR)
                if existing.is_dir:
                    self._ensure_listed(existing)
                    if self._children.get(existing_ino):
                        raise _err(errno.ENOTEMPTY)
                    del self._children[parent_new][new]
                    del self._children[existing_ino]
                    self._count_subdir(parent_new, -1)
                    del self._entries[existing_ino]
                    self.journal.delete(existing_ino)
                else:
                    self._remove(existing)
            del self._children[parent_old][old]
            if moving.is_dir:
                self._count_subdir(parent_old, -1)
                self._count_subdir(parent_new, 1)
            moving.parent, moving.name = parent_new, new
            self._children[parent_new][new] = moving.ino
            moving.ctime_ns = self._now_ns()
            self.journal.update(moving)
            self._touch_dir(src_dir)
            self._touch_dir(dst_dir)
            for entry in self._walk(moving):
                self._claim_tombstone(entry)
                if self._needs_work(entry):
                    if entry.state != DIRTY or entry.writers == 0:
                        self._schedule(entry, bump=False)
                    self.journal.update(entry)

    def _walk(self, entry: Entry) -> Iterator[Entry]:
        if not entry.is_dir:
            yield entry
            return
        stack = [entry.ino]
        while stack:
            for child in self._children.get(stack.pop(), {}).values():
                sub = self._entries[child]
                if sub.is_dir:
                    stack.append(child)
                else:
                    yield sub

    def symlink(self, parent: int, name: str, target: str, uid: int, gid: int) -> Attr:
        raise _err(errno.EPERM, "symbolic links cannot be stored in the object store")

    def link(self, ino: int, parent: int, name: str) -> Attr:
        raise _err(errno.EPERM, "hard links cannot be stored in the object store")

    def statfs(self) -> os.statvfs_result:
        return os.statvfs(self.cache_dir)

    # ------------------------------------------------------------------ flusher interface

    def request_flush(self) -> int:
        """Make everything dirty now due immediately; return the sequence to wait for."""
        with self._lock:
            self._force_until_seq = next(self._seq)
            self.changed.notify_all()
            return self._force_until_seq

    def pending_summary(self) -> dict[str, int]:
        with self._lock:
            dirty = [self._entries[i] for i in self._pending if i in self._entries]
            return {
                "dirty_files": sum(1 for e in dirty if e.state == DIRTY),
                "uploading_files": sum(1 for e in dirty if e.in_flight),
                "pending_moves": sum(1 for e in dirty if e.state != DIRTY),
                "pending_deletes": len(self._tombstones),
                "open_writers": sum(1 for e in dirty if e.writers),
            }

    def idle(self, upto_seq: int | None = None) -> bool:
        """True when nothing (or nothing changed before ``upto_seq``) waits for the store."""
        with self._lock:
            if self._tombstones or self.stale_uploads:
                return False
            for ino in self._pending:
                entry = self._entries.get(ino)
                if entry is not None and (upto_seq is None or entry.dirty_seq <= upto_seq):
                    return False
            return True

    def _marker_blocked(self, entry: Entry) -> bool:
        """A commit marker waits for every file written before it below its directory."""
        if not self.flush_policy.is_commit_marker(entry.name):
            return False
        directory = self._entries.get(entry.parent)
        if directory is None:
            return False
        for ino in self._pending:
            other = self._entries.get(ino)
            if other is None or other is entry or other.dirty_seq > entry.seq:
                continue
            if self.flush_policy.is_commit_marker(other.name) and other.parent == entry.parent:
                continue
            ancestor = other
            while ancestor.ino != ROOT_INO:
                ancestor = self._entries.get(ancestor.parent) or self._entries[ROOT_INO]
                if ancestor.ino == directory.ino:
                    return True
        return False

    def collect_work(self, limit: int, force: bool = False) -> list[Work]:
        """Hand the flusher up to ``limit`` operations that are due and safe to run now."""
        now = time.monotonic()
        out: list[Work] = []
        with self._lock:
            for key in sorted(self._tombstones):
                if len(out) >= limit:
                    return out
                if key not in self._owners:
                    self._owners[key] = -1  # reserved by the delete
                    out.append(DeleteWork(key))
            force = force or self._draining
            # Filter before sorting: during a burst of thousands of new files almost none is
            # due yet, and this runs on every wake-up of the flusher.
            forced = self._force_until_seq
            due = []
            for ino in self._pending:
                entry = self._entries.get(ino)
                if entry is None or entry.in_flight or entry.unlinked:
                    continue
                if entry.writers and entry.sync_wanted <= entry.durable_gen:
                    continue
                if not (force or entry.dirty_seq <= forced) and entry.due > now:
                    continue
                due.append(entry)
            due.sort(key=lambda e: e.seq)
            for entry in due:
                if len(out) >= limit:
                    break
                work = self._start(entry)
                if work is not None:
                    out.append(work)
        return out

    def _start(self, entry: Entry) -> Work | None:
        key = self.key_of(entry)
        owner = self._owners.get(key)
        if owner is not None and owner != entry.ino:
            return None
        if key in self._tombstones:
            return None
        if self._marker_blocked(entry):
            return None
        metadata = {"mode": oct(entry.mode & 0o7777), "uid": str(entry.uid),
                    "gid": str(entry.gid), "mtime-ns": str(entry.mtime_ns)}
        if entry.state == DIRTY:
            try:
                fd = os.open(self._data_path(entry.ino), os.O_RDONLY)
            except FileNotFoundError:
                self._lose_local(entry, "data file vanished before upload")
                return None
            size = os.fstat(fd).st_size
            self.journal.add_upload(entry.ino, key)
            entry.in_flight = True
            self._owners[key] = entry.ino
            return UploadWork(ino=entry.ino, key=key, gen=entry.gen, fd=fd, size=size,
                              metadata=metadata, path=self.path_of(entry))
        if entry.remote_key is None:
            self._pending.discard(entry.ino)
            return None
        entry.in_flight = True
        self._owners[key] = entry.ino
        return MoveWork(ino=entry.ino, src=entry.remote_key, dst=key,
                        metadata=metadata if entry.meta_dirty else None)

    def upload_source_current(self, work: UploadWork) -> bool:
        """Nobody opened the file for writing since ``work`` was handed out: what the
        flusher read from it is one version of the file, not a mix of two (a rewrite racing
        an upload must never leave a torn object in the store)."""
        with self._lock:
            entry = self._entries.get(work.ino)
            return entry is not None and not entry.unlinked and entry.gen == work.gen \
                and (entry.writers == 0 or entry.sync_wanted > entry.durable_gen)

    def prepare_upload(self, work: UploadWork) -> bool:
        """Called by the flusher before the first request of an upload; False if the file
        changed since (the upload is pointless and retried later). Rules: the data is
        durable before it is uploaded (else a power loss could leave an older or torn local
        file that recovery uploads over the newer object), and so is the upload intent (else
        nobody would abort a multipart upload the crash interrupted)."""
        if not self.upload_source_current(work):
            return False
        os.fsync(work.fd)
        self._sync_dir(self._data_path(work.ino).parent)
        st = os.fstat(work.fd)
        with self._lock:
            entry = self._entries.get(work.ino)
            if entry is not None and entry.gen == work.gen and entry.writers == 0 \
                    and entry.state == DIRTY and not entry.unlinked \
                    and st.st_size == work.size:
                self.dirty_bytes += st.st_size - entry.size
                entry.size, entry.mtime_ns = st.st_size, st.st_mtime_ns
                entry.synced = True
                self.journal.update(entry)
        self.journal.sync()
        return True

    def sync_journal(self) -> None:
        """Make every journaled change durable against power loss."""
        self.journal.sync()

    def set_upload_id(self, work: UploadWork, upload_id: str) -> None:
        self.journal.set_upload_id(work.ino, work.key, upload_id)

    def finish_upload(self, work: UploadWork, etag: str | None, error: Exception | None) -> None:
        try:
            self._finish_upload(work, error)
        except (sqlite3.Error, OSError) as exc:
            # E.g. the cache disk is full. The transaction rolled back: the intent row is
            # still journaled and the file still DIRTY, so retrying the upload later (and a
            # restart) both do the right thing. Nothing may stay in flight for ever.
            log.error("cannot journal the upload of %s (%s); it stays dirty and is uploaded "
                      "again later", work.path, exc)
            self._on_event("journal_error", 1)
            with self._lock:
                self.journal_errors += 1
                entry = self._entries.get(work.ino)
                if entry is not None and entry.state == CLEAN and not entry.unlinked:
                    # Undo the transition the journal did not take: the entry is uploaded
                    # (and journaled) again.
                    entry.state = DIRTY
                    self.clean_bytes -= entry.size
                    self.dirty_bytes += entry.size
                if entry is not None:
                    entry.in_flight = False
                    entry.due = time.monotonic() + 5.0
                    if not entry.unlinked:
                        self._add_pending(entry)
                self.changed.notify_all()

    def _finish_upload(self, work: UploadWork, error: Exception | None) -> None:
        with self._lock, self.journal.transaction():
            entry = self._entries.get(work.ino)
            self.journal.remove_upload(work.ino, work.key)
            if entry is None:
                self._release_key(work.key)
                self.changed.notify_all()
                return
            entry.in_flight = False
            if error is not None:
                if entry.unlinked:
                    self._forget_unlinked(entry, work.key)
                elif entry.remote_key != work.key:
                    # A failed PUT never lands and a failed multipart upload was aborted:
                    # nothing of ours is at the key, so give up the reservation.
                    self._owners.pop(work.key, None)
                entry.due = time.monotonic() + 1.0
                self.changed.notify_all()
                return
            old = entry.remote_key
            entry.remote_key = work.key
            entry.remote_size = work.size
            self._owners[work.key] = entry.ino
            entry.durable_gen = max(entry.durable_gen, work.gen)
            if old is not None and old != work.key:
                self._release_key(old)
            if entry.unlinked:
                self._forget_unlinked(entry, None)
            elif entry.gen == work.gen and entry.writers == 0 and entry.state == DIRTY:
                self._mark_clean(entry, work.size)
            else:
                self.journal.update(entry)
            self.changed.notify_all()

    def finish_move(self, work: MoveWork, error: Exception | None) -> None:
        with self._lock, self.journal.transaction():
            entry = self._entries.get(work.ino)
            if entry is not None:
                entry.in_flight = False
            if entry is None:
                self._release_key(work.dst)
            elif entry.unlinked:
                self._forget_unlinked(entry, work.dst)
            elif error is not None:
                if isinstance(error, FileNotFoundError):
                    log.error("object %s vanished from the store before it could be moved "
                              "to %s", work.src, work.dst)
                    self._lose_local(entry, "source object is gone")
                if work.dst != work.src and self._owners.get(work.dst) == entry.ino:
                    del self._owners[work.dst]
                entry.due = time.monotonic() + 1.0
            else:
                old = entry.remote_key
                entry.remote_key = work.dst
                self._owners[work.dst] = entry.ino
                if work.metadata is not None:
                    entry.meta_dirty = False
                if old is not None and old != work.dst:
                    self._release_key(old)
                if not self._needs_work(entry):
                    self._pending.discard(entry.ino)
                self.journal.update(entry)
            self.changed.notify_all()

    def _mark_clean(self, entry: Entry, size: int) -> None:
        entry.state = CLEAN
        entry.remote_size = size
        entry.meta_dirty = False
        self.dirty_bytes -= entry.size
        self.clean_bytes += entry.size
        if not self._needs_work(entry):
            self._pending.discard(entry.ino)
        self.journal.update(entry)

    def _forget_unlinked(self, entry: Entry, reserved: str | None) -> None:
        """An entry removed while its upload or move ran: give up every key it holds."""
        for key in {entry.remote_key, reserved} - {None}:
            if key is not None and self._owners.get(key) == entry.ino:
                self._release_key(key)
        entry.remote_key = None
        if entry.opens == 0:
            self._entries.pop(entry.ino, None)

    def finish_delete(self, work: DeleteWork, error: Exception | None) -> None:
        with self._lock, self.journal.transaction():
            if self._owners.get(work.key) == -1:
                del self._owners[work.key]
            if error is None:
                self._tombstones.discard(work.key)
                self.journal.remove_tombstone(work.key)
                wanting = self._resolve(work.key)
                if wanting is not None and not wanting.is_dir and wanting.remote_key is None:
                    self._schedule(wanting, delay=0.0)
            self.changed.notify_all()

    def finish_stale_uploads(self) -> list[tuple[str, str | None]]:
        with self._lock:
            stale, self.stale_uploads = self.stale_uploads, []
            return stale

    # ------------------------------------------------------------------ drain

    @property
    def draining(self) -> bool:
        return self._draining

    def set_draining(self, on: bool) -> None:
        with self._lock:
            self._draining = on
            self.changed.notify_all()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for entry in self._entries.values():
                if entry.fd >= 0:
                    os.close(entry.fd)
                    entry.fd = -1
            for ino, fd in self._spares:
                os.close(fd)
                self._data_path(ino).unlink(missing_ok=True)
            self._spares.clear()
            self.journal.close()

    def entry_count(self) -> int:
        with self._lock:
            return len(self._entries)

    def debug_entry(self, path: str) -> dict[str, Any] | None:
        with self._lock:
            entry = self._resolve(path)
            if entry is None:
                return None
            return {"ino": entry.ino, "state": entry.state, "remote_key": entry.remote_key,
                    "local": entry.local, "size": entry.size, "in_flight": entry.in_flight}

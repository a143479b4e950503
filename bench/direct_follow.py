"""The "direct" data path prototype: applications write a local directory, a follower uploads.

The study of docs/dev/direct.md. Applications write into ``root`` (a directory on an XFS or
btrfs file system) with no FUSE in between. ``Follower`` watches the file system with
fanotify (``bench/fanotify.py``) and, when a file is closed after writing
(``FAN_CLOSE_WRITE``), takes a reflink snapshot of it (``FICLONE``: a stable version even if
the file is rewritten during the upload) and uploads the snapshot. Renames and deletes follow
the names. The journal (SQLite, WAL) records what was uploaded: path, inode, size, mtime and
ctime at the snapshot; ``scan()`` compares the tree with it on start, so a daemon restart or a
power cut re-uploads whatever changed and deletes what disappeared. The local file system is
the journal for data and names: the daemon journals only what it uploaded, after it did.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import select
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from bench.fanotify import (
    FAN_CLOSE_WRITE,
    FAN_CREATE,
    FAN_DELETE,
    FAN_MOVED_FROM,
    FAN_MOVED_TO,
    FAN_ONDIR,
    FAN_Q_OVERFLOW,
    FAN_RENAME,
    Event,
    Fanotify,
)

__all__ = ["Follower", "Upload"]

log = logging.getLogger(__name__)

FICLONE = 0x40049409
MASK = FAN_CLOSE_WRITE | FAN_CREATE | FAN_DELETE | FAN_RENAME | FAN_ONDIR
#: Before 5.17 (no FAN_RENAME) a rename is a MOVED_FROM and a MOVED_TO event.
LEGACY_MASK = MASK & ~FAN_RENAME | FAN_MOVED_FROM | FAN_MOVED_TO
_SCHEMA = """CREATE TABLE IF NOT EXISTS uploaded (
    path TEXT PRIMARY KEY, ino INTEGER, size INTEGER, mtime_ns INTEGER, ctime_ns INTEGER,
    etag TEXT)"""


@dataclass
class Upload:
    """One finished upload: when the close was seen, when the object was complete."""

    path: str
    size: int
    queued: float
    done: float


@dataclass
class _State:
    queue: dict[str, float] = field(default_factory=dict)  # path -> when queued
    busy: set[str] = field(default_factory=set)
    uploads: list[Upload] = field(default_factory=list)
    deletes: int = 0
    skipped: int = 0
    events: int = 0
    overflows: int = 0


def _version(st: os.stat_result) -> tuple[int, int, int, int]:
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


class Follower:
    """Follows ``root`` with fanotify and uploads closed files to ``bucket/prefix``."""

    def __init__(self, root: str, state_dir: str, client: Any, bucket: str, prefix: str = "",
                 *, uploaders: int = 2, transfer: Any = None,
                 legacy_renames: bool = False) -> None:
        self.root = os.path.realpath(root)
        self.snapdir = os.path.join(state_dir, "snapshots")
        os.makedirs(self.snapdir, exist_ok=True)
        self._client, self._bucket, self._prefix = client, bucket, prefix
        self._transfer = transfer
        self._db = sqlite3.connect(os.path.join(state_dir, "journal.db"),
                                   check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(_SCHEMA)
        self._db_lock = threading.Lock()
        self._cond = threading.Condition()
        self._stop = False
        #: The event reader failed: nothing closed from then on is seen (until a restart scans).
        self.failed = False
        self.state = _State()
        #: ``legacy_renames`` forces the pre-5.17 events (tests); older kernels refuse
        #: FAN_RENAME with EINVAL and get them anyway.
        try:
            self._fan = Fanotify(self.root, LEGACY_MASK if legacy_renames else MASK)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            self._fan = Fanotify(self.root, LEGACY_MASK)
        self._threads = [threading.Thread(target=self._follow, name="follow", daemon=True)]
        self._threads += [threading.Thread(target=self._upload_loop, name=f"upload-{i}",
                                           daemon=True) for i in range(uploaders)]
        self._snap_seq = 0

    # --- lifecycle --------------------------------------------------------------------------
    def start(self) -> Follower:
        for thread in self._threads:
            thread.start()
        self.scan()  # after the mark: nothing closed from now on can be missed
        return self

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout=60)
        self._fan.close()
        self._db.close()

    def wait_idle(self, timeout: float) -> bool:
        """True once nothing is queued or uploading (within ``timeout`` seconds)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.state.queue or self.state.busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    # --- recovery ---------------------------------------------------------------------------
    def scan(self) -> int:
        """Queue every file whose (inode, size, mtime, ctime) differs from what was uploaded;
        delete objects whose file is gone. Returns how many files were queued."""
        with self._db_lock:
            known = {row[0]: tuple(row[1:]) for row in self._db.execute(
                "SELECT path, ino, size, mtime_ns, ctime_ns FROM uploaded")}
        queued = 0
        seen: set[str] = set()
        for dirpath, _dirs, files in os.walk(self.root):
            for name in files:
                path = os.path.join(dirpath, name)
                rel = os.path.relpath(path, self.root)
                seen.add(rel)
                try:
                    st = os.lstat(path)
                except FileNotFoundError:
                    continue
                if known.get(rel) != _version(st):
                    self._enqueue(path)
                    queued += 1
        for rel in set(known) - seen:
            self._delete(rel)
        return queued

    # --- events -----------------------------------------------------------------------------
    def _follow(self) -> None:
        poller = select.poll()
        poller.register(self._fan.fd, select.POLLIN)
        while not self._stop:
            if not poller.poll(200):
                continue
            try:
                events = list(self._fan.read())
            except OSError:
                log.exception("reading fanotify events of %s: the follower stops", self.root)
                self.failed = True
                return
            for event in events:
                self.state.events += 1
                try:
                    self._on_event(event)
                except Exception:
                    log.exception("following %s", event)

    def _on_event(self, event: Event) -> None:
        if event.mask & FAN_Q_OVERFLOW:
            self.state.overflows += 1
            log.warning("fanotify queue overflow under %s: rescanning", self.root)
            self.scan()
            return
        path = event.path
        if event.mask & FAN_RENAME:
            old = event.old_path
            if old is not None and self._inside(old):
                self._forget(old, is_dir=bool(event.mask & FAN_ONDIR))
            if path is not None and self._inside(path):
                self._enqueue_tree(path) if event.mask & FAN_ONDIR else self._enqueue(path)
            return
        if path is None or not self._inside(path):
            return
        if event.mask & FAN_DELETE:
            self._forget(path, is_dir=bool(event.mask & FAN_ONDIR))
        elif event.mask & FAN_CLOSE_WRITE and not event.mask & FAN_ONDIR:
            self._enqueue(path)
        elif event.mask & (FAN_MOVED_TO | FAN_CREATE) and event.mask & FAN_ONDIR:
            self._enqueue_tree(path)
        elif event.mask & FAN_MOVED_TO:
            self._enqueue(path)
        elif event.mask & FAN_MOVED_FROM:
            self._forget(path, is_dir=bool(event.mask & FAN_ONDIR))

    def _inside(self, path: str) -> bool:
        return path == self.root or path.startswith(self.root + os.sep)

    def _enqueue(self, path: str) -> None:
        with self._cond:
            self.state.queue.setdefault(path, time.monotonic())
            self._cond.notify()

    def _enqueue_tree(self, path: str) -> None:
        for dirpath, _dirs, files in os.walk(path):
            for name in files:
                self._enqueue(os.path.join(dirpath, name))

    def _forget(self, path: str, *, is_dir: bool) -> None:
        rel = os.path.relpath(path, self.root)
        with self._cond:
            for queued in [p for p in self.state.queue
                           if p == path or (is_dir and p.startswith(path + os.sep))]:
                del self.state.queue[queued]
        with self._db_lock:
            rows = [r[0] for r in self._db.execute(
                "SELECT path FROM uploaded WHERE path = ? OR (? AND substr(path, 1, ?) = ?)",
                (rel, is_dir, len(rel) + 1, rel + "/"))]
        for row in rows:
            self._delete(row)

    # --- uploads ----------------------------------------------------------------------------
    def _upload_loop(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not any(p not in self.state.busy
                                                 for p in self.state.queue):
                    self._cond.wait()
                if self._stop:
                    return
                path = next(p for p in self.state.queue if p not in self.state.busy)
                queued = self.state.queue.pop(path)
                self.state.busy.add(path)
            try:
                self._upload(path, queued)
            except Exception:
                log.exception("uploading %s; it stays for the next scan", path)
            finally:
                with self._cond:
                    self.state.busy.discard(path)
                    self._cond.notify_all()

    def _upload(self, path: str, queued: float) -> None:
        rel = os.path.relpath(path, self.root)
        try:
            src = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            return  # gone, or a symlink: its delete/rename event says what to do
        try:
            # The version is taken BEFORE the clone: a write in between makes the journal
            # older than the object (a needless re-upload), never newer (a lost update).
            st = os.fstat(src)
            with self._db_lock:
                row = self._db.execute("SELECT ino, size, mtime_ns, ctime_ns FROM uploaded "
                                       "WHERE path = ?", (rel,)).fetchone()
            if row is not None and tuple(row) == _version(st):
                self.state.skipped += 1
                return
            snap = self._snapshot(src)
        finally:
            os.close(src)
        try:
            self._client.upload_file(snap, self._bucket, self._prefix + rel,
                                     **({"Config": self._transfer} if self._transfer else {}))
            with self._db_lock:
                self._db.execute("INSERT OR REPLACE INTO uploaded VALUES (?, ?, ?, ?, ?, ?)",
                                 (rel, *_version(st), ""))
        finally:
            os.unlink(snap)
        with self._cond:
            self.state.uploads.append(Upload(rel, st.st_size, queued, time.monotonic()))

    def _snapshot(self, src: int) -> str:
        with self._cond:
            self._snap_seq += 1
            snap = os.path.join(self.snapdir, f"{os.getpid()}.{self._snap_seq}")
        dst = os.open(snap, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            fcntl.ioctl(dst, FICLONE, src)
        except OSError:
            os.close(dst)
            os.unlink(snap)
            raise
        os.close(dst)
        return snap

    def _delete(self, rel: str) -> None:
        self._client.delete_object(Bucket=self._bucket, Key=self._prefix + rel)
        with self._db_lock:
            self._db.execute("DELETE FROM uploaded WHERE path = ?", (rel,))
        self.state.deletes += 1

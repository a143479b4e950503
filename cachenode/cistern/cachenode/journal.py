"""The metadata journal: SQLite in WAL mode, the source of truth for the cache state.

Every state change that matters is written here before it is acted on (see
docs/dev/cachenode.md for the invariants and the crash-recovery table). Commits use
``synchronous=NORMAL``: they survive a crash of the daemon; ``sync()`` additionally fsyncs the
WAL so they survive a power loss, which ``fsync`` on a file in the mount asks for.

New files go through the intent log first (``log_insert``, intentlog.py): one ``write(2)``
instead of a commit; the rows reach SQLite in batches (``apply_intents``, from a background
thread) and always before any other journal statement, so SQLite sees every change in the
order it was made.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from cistern.cachenode.intentlog import IntentLog, Row

__all__ = ["Entry", "Journal", "UploadIntent"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    ino INTEGER PRIMARY KEY AUTOINCREMENT,
    parent INTEGER NOT NULL,
    name TEXT NOT NULL,
    is_dir INTEGER NOT NULL,
    mode INTEGER NOT NULL,
    uid INTEGER NOT NULL,
    gid INTEGER NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    ctime_ns INTEGER NOT NULL,
    state TEXT NOT NULL,
    local INTEGER NOT NULL,
    remote_key TEXT,
    remote_size INTEGER,
    listed INTEGER NOT NULL,
    meta_dirty INTEGER NOT NULL DEFAULT 0,
    synced INTEGER NOT NULL DEFAULT 0,
    etag TEXT,
    UNIQUE (parent, name)
);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tombstones (key TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS uploads (
    ino INTEGER NOT NULL,
    key TEXT NOT NULL,
    upload_id TEXT,
    PRIMARY KEY (ino, key)
);
"""

_COLUMNS = ("ino", "parent", "name", "is_dir", "mode", "uid", "gid", "size", "mtime_ns",
            "ctime_ns", "state", "local", "remote_key", "remote_size", "listed", "meta_dirty",
            "synced", "etag")

DIRTY, CLEAN, REMOTE, DIR = "dirty", "clean", "remote", "dir"

_INSERT_WITH_INO = (f"INSERT INTO entries ({', '.join(_COLUMNS)}) "
                    f"VALUES ({', '.join('?' * len(_COLUMNS))})")
_INSERT_NEW_INO = (f"INSERT INTO entries ({', '.join(_COLUMNS[1:])}) "
                   f"VALUES ({', '.join('?' * (len(_COLUMNS) - 1))})")
_APPLIED = "intents_applied"
"""meta: the seq of the last intent-log record applied to SQLite."""
INTENTS_INLINE = 4096
"""Rows waiting in the intent log above which ``log_insert`` applies them itself."""
_UPDATE = f"UPDATE entries SET {', '.join(f'{c}=?' for c in _COLUMNS[1:])} WHERE ino=?"


@dataclass(slots=True, eq=False)
class Entry:
    """One file or directory. Persistent fields mirror a journal row; the rest is runtime."""

    ino: int
    parent: int
    name: str
    is_dir: bool
    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    ctime_ns: int
    state: str
    local: bool
    remote_key: str | None = None
    remote_size: int | None = None
    listed: bool = True
    meta_dirty: bool = False
    #: Power-loss rule (docs/dev/cachenode.md): the data file was fsync'd with this row's size
    #: and mtime and no open for writing or truncate has happened since. Set False durably
    #: (if the file has an object) before a modifying operation is acknowledged.
    synced: bool = False
    #: The ETag of the object at ``remote_key`` as this node last wrote or saw it (PUT
    #: answer, listing, fetch); None if unknown. An overwrite is conditional on it.
    etag: str | None = None
    # runtime only
    gen: int = 0
    writers: int = 0
    opens: int = 0
    fd: int = -1
    in_flight: bool = False
    due: float = 0.0
    seq: int = 0
    dirty_seq: int = 0
    durable_gen: int = -1
    sync_wanted: int = -1
    last_access: float = 0.0
    validated: float = 0.0  # monotonic time the ETag was last checked (0: not since start)
    unlinked: bool = False
    # streaming uploads (core/streams.py) and /status checkpoint progress
    streamed: int = 0
    durable_at: float | None = None
    waiters: list[object] = field(default_factory=list)

    def row(self) -> Row:
        return (self.ino, self.parent, self.name, int(self.is_dir), self.mode, self.uid,
                self.gid, self.size, self.mtime_ns, self.ctime_ns, self.state, int(self.local),
                self.remote_key, self.remote_size, int(self.listed), int(self.meta_dirty),
                int(self.synced), self.etag)


@dataclass(frozen=True)
class UploadIntent:
    ino: int
    key: str
    upload_id: str | None


class Journal:
    """A thin, thread-safe wrapper over one SQLite connection.

    The connection is in autocommit mode: a single statement is its own transaction (or
    joins the one ``transaction()`` has open), so it costs one SQLite call, not three.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.RLock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        columns = {r[1] for r in self._db.execute("PRAGMA table_info(entries)")}
        if "synced" not in columns:  # a journal written before the power-loss rules
            self._db.execute("ALTER TABLE entries ADD COLUMN synced INTEGER NOT NULL DEFAULT 0")
        if "etag" not in columns:  # a journal written before ETags were kept
            self._db.execute("ALTER TABLE entries ADD COLUMN etag TEXT")
        self._depth = 0
        self._sync_at_commit = False
        self._log_lock = threading.Lock()  # the intent log and _pending; taken after _lock
        self._pending: list[Row] = []
        self._intents = IntentLog(Path(f"{path}-intents"))
        self._seq = self._replay_intents()

    def _replay_intents(self) -> int:
        """Apply what a stopped daemon left in the intent log; return the last seq."""
        row = self._db.execute("SELECT value FROM meta WHERE name=?", (_APPLIED,)).fetchone()
        applied = int(row[0]) if row else 0
        records = self._intents.read(applied)
        if records:
            with self.transaction():
                self._db.executemany(_INSERT_WITH_INO, [r for _, r in records])
                self._set_applied(records[-1][0])
            applied = records[-1][0]
        self._intents.clear()
        return applied

    def _set_applied(self, seq: int) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)",
                         (_APPLIED, str(seq)))

    def close(self) -> None:
        with self._lock:
            self._apply_locked()
            self._intents.clear()
            self._intents.close()
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._db.close()

    # ------------------------------------------------------------------ the intent log

    def log_insert(self, entry: Entry) -> None:
        """Journal a new entry (its ino given) with one append to the intent log.

        As durable as ``insert`` against a daemon crash (the page cache keeps the record);
        against power loss both need ``sync``, which applies the log first.
        """
        row = entry.row()
        with self._log_lock:
            self._seq += 1
            try:
                self._intents.append(self._seq, row)
            except BaseException:
                self._seq -= 1
                raise
            self._pending.append(row)
            backlog = len(self._pending)
        if backlog >= INTENTS_INLINE:
            self.apply_intents()

    def intents_pending(self) -> int:
        return len(self._pending)

    def apply_intents(self) -> int:
        """Move the rows waiting in the intent log into SQLite (one commit); return how many.
        Appends go on meanwhile (into the log's other file)."""
        with self._lock:
            return self._apply_locked()

    def _apply_locked(self) -> int:
        # Inside a transaction its BEGIN applied them already (and creates, which append,
        # hold the core lock, as every caller of a transaction does).
        if self._depth or not self._pending:
            return 0
        with self._log_lock:
            if not self._pending:
                return 0
            batch, self._pending = self._pending, []
            last = self._seq
            self._intents.swap()
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(_INSERT_WITH_INO, batch)
                self._set_applied(last)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        except BaseException:
            with self._log_lock:
                self._pending[:0] = batch  # still in the log files; tried again next time
            raise
        with self._log_lock:
            self._intents.clear_previous()
        return len(batch)

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Group several changes into one commit (nested uses join the outer one)."""
        with self._lock:
            if self._depth == 0:
                self._apply_locked()
                self._db.execute("BEGIN IMMEDIATE")
            self._depth += 1
            try:
                yield
            except BaseException:
                self._depth -= 1
                if self._depth == 0:
                    self._db.execute("ROLLBACK")
                raise
            self._depth -= 1
            if self._depth == 0:
                self._db.execute("COMMIT")
                if self._sync_at_commit:
                    self._sync_at_commit = False
                    self._sync_wal()

    def sync(self) -> None:
        """Make every committed change durable against power loss (fsync the WAL).

        Inside ``transaction()`` the sync happens right after its commit (a change not yet
        committed cannot be made durable)."""
        with self._lock:
            if self._depth:
                self._sync_at_commit = True
                return
            self._apply_locked()
        self._sync_wal()

    def _sync_wal(self) -> None:
        wal = f"{self.path}-wal"
        try:
            fd = os.open(wal, os.O_RDONLY)
        except FileNotFoundError:
            return
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def load(self) -> list[Entry]:
        with self._lock:
            self._apply_locked()
            rows = self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM entries").fetchall()
        return [Entry(ino=r[0], parent=r[1], name=r[2], is_dir=bool(r[3]), mode=r[4], uid=r[5],
                      gid=r[6], size=r[7], mtime_ns=r[8], ctime_ns=r[9], state=r[10],
                      local=bool(r[11]), remote_key=r[12], remote_size=r[13],
                      listed=bool(r[14]), meta_dirty=bool(r[15]), synced=bool(r[16]),
                      etag=r[17])
                for r in rows]

    def get_meta(self, name: str) -> str | None:
        with self._lock:
            self._apply_locked()
            row = self._db.execute("SELECT value FROM meta WHERE name=?", (name,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, name: str, value: str) -> None:
        with self._lock:
            self._apply_locked()
            self._db.execute("INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)",
                             (name, value))

    def insert(self, entry: Entry) -> int:
        """Insert a new entry (``entry.ino`` 0 lets the journal pick one); return its ino."""
        row = entry.row()
        with self._lock:
            self._apply_locked()
            if entry.ino == 0:
                cursor = self._db.execute(_INSERT_NEW_INO, row[1:])
                return int(cursor.lastrowid or 0)
            self._db.execute(_INSERT_WITH_INO, row)
        return entry.ino

    def reserve_inos(self, count: int) -> int:
        """Reserve ``count`` consecutive inode numbers; return the first.

        No entry has them and AUTOINCREMENT never hands them out (the reservation moves the
        sequence past them), so they can name data files before their entries exist.
        """
        with self.transaction():
            row = self._db.execute(
                "SELECT seq FROM sqlite_sequence WHERE name='entries'").fetchone()
            first = (int(row[0]) if row else 0) + 1
            if row:
                self._db.execute("UPDATE sqlite_sequence SET seq=? WHERE name='entries'",
                                 (first + count - 1,))
            else:
                self._db.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('entries', ?)",
                                 (first + count - 1,))
        return first

    def update(self, entry: Entry) -> None:
        with self._lock:
            self._apply_locked()
            self._db.execute(_UPDATE, (*entry.row()[1:], entry.ino))

    def delete(self, ino: int) -> None:
        with self._lock:
            self._apply_locked()
            self._db.execute("DELETE FROM entries WHERE ino=?", (ino,))

    def tombstones(self) -> set[str]:
        with self._lock:
            self._apply_locked()
            return {r[0] for r in self._db.execute("SELECT key FROM tombstones")}

    def add_tombstone(self, key: str) -> None:
        with self._lock:
            self._apply_locked()
            self._db.execute("INSERT OR IGNORE INTO tombstones (key) VALUES (?)", (key,))

    def remove_tombstone(self, key: str) -> None:
        with self._lock:
            self._apply_locked()
            self._db.execute("DELETE FROM tombstones WHERE key=?", (key,))

    def add_upload(self, ino: int, key: str) -> None:
        with self._lock:
            self._apply_locked()
            self._db.execute("INSERT OR REPLACE INTO uploads (ino, key, upload_id) "
                             "VALUES (?, ?, NULL)", (ino, key))

    def set_upload_id(self, ino: int, key: str, upload_id: str) -> None:
        with self._lock:
            self._apply_locked()
            self._db.execute("UPDATE uploads SET upload_id=? WHERE ino=? AND key=?",
                             (upload_id, ino, key))

    def remove_upload(self, ino: int, key: str) -> None:
        with self._lock:
            self._apply_locked()
            self._db.execute("DELETE FROM uploads WHERE ino=? AND key=?", (ino, key))

    def uploads(self) -> list[UploadIntent]:
        with self._lock:
            self._apply_locked()
            return [UploadIntent(*r) for r in
                    self._db.execute("SELECT ino, key, upload_id FROM uploads")]

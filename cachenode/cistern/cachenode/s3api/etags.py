"""ETags the endpoint computed (MD5s) kept beside the cache, so they outlive a restart.

A record is ``key → (inode, size, mtime, ETag)`` and counts only while the file at ``key``
still has that inode, size and mtime: a file rewritten through the mount, replaced, evicted
and fetched again, or renamed onto the key no longer matches and gets an opaque ETag instead.
Records are advisory (no fsync: losing one costs an MD5-looking ETag, never data) and bounded.
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
import time
from collections import OrderedDict
from pathlib import Path

from cistern.cachenode.core import Attr

__all__ = ["EtagBook", "opaque_etag"]

MEMORY = 65536
"""Records kept in memory (most recently used)."""
ON_DISK = 1_000_000
"""Records kept on disk; the oldest are pruned beyond that."""


def opaque_etag(attr: Attr) -> str:
    """An ETag for a file whose MD5 the endpoint did not see: stable while the file does not
    change, different when it does. Its ``-1`` suffix tells clients it is not an MD5."""
    digest = hashlib.sha256(f"{attr.ino}:{attr.size}:{attr.mtime_ns}".encode()).hexdigest()
    return f'"{digest[:32]}-1"'


class EtagBook:
    def __init__(self, path: Path) -> None:
        self._lock = threading.Lock()
        self._memory: OrderedDict[str, tuple[int, int, int, str]] = OrderedDict()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=OFF")
        self._db.execute("CREATE TABLE IF NOT EXISTS etags (key TEXT PRIMARY KEY, ino INTEGER, "
                         "size INTEGER, mtime_ns INTEGER, etag TEXT, written REAL)")
        self._db.execute("CREATE INDEX IF NOT EXISTS etags_written ON etags (written)")
        self._writes = 0

    def _remember(self, key: str, record: tuple[int, int, int, str]) -> None:
        self._memory[key] = record
        self._memory.move_to_end(key)
        while len(self._memory) > MEMORY:
            self._memory.popitem(last=False)

    def put(self, key: str, attr: Attr, etag: str) -> None:
        record = (attr.ino, attr.size, attr.mtime_ns, etag)
        with self._lock:
            self._remember(key, record)
            self._db.execute("INSERT OR REPLACE INTO etags VALUES (?, ?, ?, ?, ?, ?)",
                             (key, *record, time.time()))
            self._writes += 1
            if self._writes % 10000 == 0:
                self._db.execute("DELETE FROM etags WHERE key IN (SELECT key FROM etags "
                                 "ORDER BY written DESC LIMIT -1 OFFSET ?)", (ON_DISK,))

    def get(self, key: str, attr: Attr) -> str:
        """The recorded ETag if the file is still the one it was recorded for."""
        with self._lock:
            record = self._memory.get(key)
            if record is None:
                row = self._db.execute("SELECT ino, size, mtime_ns, etag FROM etags "
                                       "WHERE key = ?", (key,)).fetchone()
                if row is not None:
                    record = (int(row[0]), int(row[1]), int(row[2]), str(row[3]))
                    self._remember(key, record)
        if record is not None and record[:3] == (attr.ino, attr.size, attr.mtime_ns):
            return record[3]
        return opaque_etag(attr)

    def forget(self, key: str) -> None:
        with self._lock:
            self._memory.pop(key, None)
            self._db.execute("DELETE FROM etags WHERE key = ?", (key,))


"""Local data files: where each file's bytes live, the pool of spare files, dropped copies.

A file's data lives in ``data/<ino % 256 as 2 hex digits>/<ino>`` under the cache directory;
``tmp/`` holds fetches in progress. Spare data files (docs/dev/cachenode.md, invariant 6) are
created ahead of need by a background thread so a create costs no file system create.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from cistern.cachenode.core.tree import Tree
from cistern.cachenode.journal import REMOTE, Entry

__all__ = ["SPARE_FILES", "SPARE_INO_BLOCK", "DataFiles"]

log = logging.getLogger(__name__)

SPARE_FILES = 64
"""Empty data files kept ready for new files (``make_spares``)."""
SPARE_INO_BLOCK = 1024
"""Inode numbers reserved in the journal per commit for spare data files."""


class DataFiles:
    def __init__(self, cache_dir: Path, tree: Tree) -> None:
        self.cache_dir = cache_dir
        self.data_dir = cache_dir / "data"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.tmp_dir = cache_dir / "tmp"
        self.tmp_dir.mkdir(exist_ok=True)
        self._tree = tree
        self._data_root = str(self.data_dir)
        self._shards: set[int] = set()
        self._spares: list[tuple[int, int]] = []
        self._spare_inos: Iterator[int] = iter(())
        self._closed = False
        self.spares_wanted = threading.Event()
        """Set when the pool of spare data files runs low (see ``make_spares``)."""
        self.on_spare: Callable[[int, int], None] | None = None
        """Called with (ino, fd) of each new spare, on the spares thread before any create
        can take it: a front end prepares what it needs per file there (fuse_passthrough
        registers the backing file), off the create's path. Must not raise."""

    def path(self, ino: int) -> Path:
        return self.data_dir / f"{ino % 256:02x}" / str(ino)

    def create_path(self, ino: int) -> str:
        """The data file's path for creating it: its shard directory is made once, not on
        every call (the create path is hot)."""
        shard = ino % 256
        if shard not in self._shards:
            os.makedirs(f"{self._data_root}/{shard:02x}", exist_ok=True)
            self._shards.add(shard)
        return f"{self._data_root}/{shard:02x}/{ino}"

    def remove_strays(self, known: set[str]) -> None:
        """Recovery: delete data files no entry owns, and every leftover temporary file."""
        for sub in self.data_dir.iterdir():
            for path in sub.iterdir() if sub.is_dir() else ():
                if str(path) not in known:
                    path.unlink(missing_ok=True)
        for item in self.tmp_dir.iterdir():
            item.unlink(missing_ok=True)

    @staticmethod
    def sync_dir(path: Path) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # ------------------------------------------------------------------ spares

    def make_spares(self, target: int = SPARE_FILES) -> int:
        """Create empty data files ahead of need, up to ``target``; return how many were made.

        Called from a background thread (the daemon's); the file system creates happen
        outside the lock. A spare's inode number is reserved in the journal first, so no
        entry can ever get it; spares left by a crash have no entry and are removed by
        recovery like any other stray data file.
        """
        made = 0
        lock = self._tree.lock
        self.spares_wanted.clear()
        while True:
            with lock:
                if self._closed or len(self._spares) >= target:
                    return made
                ino = next(self._spare_inos, None)
                if ino is None:
                    first = self._tree.journal.reserve_inos(SPARE_INO_BLOCK)
                    self._spare_inos = iter(range(first, first + SPARE_INO_BLOCK))
                    ino = next(self._spare_inos)
            path = self.create_path(ino)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            if self.on_spare is not None:
                self.on_spare(ino, fd)
            with lock:
                if self._closed:
                    os.close(fd)
                    os.unlink(path)
                    return made
                self._spares.append((ino, fd))
            made += 1

    def take_spare(self) -> tuple[int, int] | None:
        """A ready (ino, fd) for a new file, or None (the caller creates one inline)."""
        spares = self._spares
        if len(spares) <= SPARE_FILES // 2 and not self.spares_wanted.is_set():
            self.spares_wanted.set()  # set() takes a lock and notifies: only when needed
        return spares.pop() if spares else None

    def put_back(self, spare: tuple[int, int]) -> None:
        self._spares.append(spare)

    def spare_inos(self) -> set[int]:
        return {ino for ino, _ in self._spares}

    def spare_count(self) -> int:
        return len(self._spares)

    def close(self) -> None:
        """Stop making spares and remove the unused ones (their inodes stay reserved)."""
        self._closed = True
        for ino, fd in self._spares:
            os.close(fd)
            self.path(ino).unlink(missing_ok=True)
        self._spares.clear()

    # ------------------------------------------------------------------ losing a copy

    def drop_local(self, entry: Entry, reason: str) -> int:
        """Drop a CLEAN local copy (eviction, TTL, retention); the store still has it."""
        self.path(entry.ino).unlink(missing_ok=True)
        entry.local = False
        entry.state = REMOTE
        self._tree.clean_bytes -= entry.size
        self._tree.journal.update(entry)
        self._tree.on_event(f"evicted:{reason}", entry.size)
        return entry.size

    def lose_local(self, entry: Entry, why: str) -> None:
        """The local data is gone when it should not be: say so loudly, keep what the store
        has (the entry falls back to REMOTE) or forget a file the store never had."""
        tree = self._tree
        log.error("DATA LOSS: %s: %s", tree.path_of(entry), why)
        tree.on_event("data_loss", 1)
        if entry.remote_key:
            entry.state, entry.local = REMOTE, False
            tree.journal.update(entry)
        else:
            if tree.child(entry.parent, entry.name) == entry.ino:
                tree.unlink_name(entry)
            del tree.entries[entry.ino]
            tree.journal.delete(entry.ino)

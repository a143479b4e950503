"""The in-memory namespace: entries by inode, names by directory, and the one core lock.

Every core module works on one ``Tree`` under its lock. Names enter and leave directories only
through ``add``, ``unlink_name``, ``move`` and ``remove_dir``, which keep the derived indexes
(subdirectory counts for ``nlink``, checkpoint directories, commit-marker parents) in step, so
nothing has to scan the namespace to answer them.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import threading
import time
from collections.abc import Callable, Iterator

from cistern.cachenode.core.model import ROOT_INO, Attr, err
from cistern.cachenode.journal import Entry, Journal

__all__ = ["EventSink", "Tree"]

EventSink = Callable[[str, float], None]
"""Counters fed by the core (``name``, ``value``); the daemon forwards them to Prometheus."""


class Tree:
    def __init__(self, journal: Journal, *, checkpoint_pattern: str,
                 is_commit_marker: Callable[[str], bool], on_event: EventSink) -> None:
        self.journal = journal
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        """Notified on every change the flusher or a waiting writer may care about."""
        self.on_event = on_event
        self.entries: dict[int, Entry] = {}
        """Every live entry, plus files unlinked while open or in flight."""
        self.children: dict[int, dict[str, int]] = {}
        self.dirty_bytes = 0
        """Bytes of DIRTY files as of their last sync (open writers may have added more)."""
        self.clean_bytes = 0
        """Bytes of CLEAN local copies."""
        self._subdirs: dict[int, int] = {}
        self._pattern = checkpoint_pattern
        self._is_marker = is_commit_marker
        self.checkpoint_dirs: set[int] = set()
        """Directories whose name matches ``checkpointPattern``."""
        self.marker_parents: dict[int, int] = {}
        """Directories holding commit markers, with how many they hold."""

    # ------------------------------------------------------------------ lookups

    def get(self, ino: int) -> Entry:
        entry = self.entries.get(ino)
        if entry is None:
            raise err(errno.ENOENT, f"inode {ino}")
        return entry

    def dir(self, ino: int) -> Entry:
        entry = self.get(ino)
        if not entry.is_dir:
            raise err(errno.ENOTDIR)
        return entry

    def child(self, parent: int, name: str) -> int | None:
        return self.children.get(parent, {}).get(name)

    def path_of(self, entry: Entry) -> str:
        parts: list[str] = []
        while entry.ino != ROOT_INO:
            parts.append(entry.name)
            parent = self.entries.get(entry.parent)
            if parent is None:
                break
            entry = parent
        return "/".join(reversed(parts))

    def key_of(self, entry: Entry) -> str:
        """The object key an entry wants: its path below the mount."""
        return self.path_of(entry)

    def resolve(self, key: str) -> Entry | None:
        ino = ROOT_INO
        for part in key.split("/"):
            child = self.children.get(ino, {}).get(part)
            if child is None:
                return None
            ino = child
        return self.entries.get(ino)

    def attr(self, entry: Entry) -> Attr:
        size, mtime = entry.size, entry.mtime_ns
        if entry.writers and entry.fd >= 0:
            st = os.fstat(entry.fd)
            size, mtime = st.st_size, st.st_mtime_ns
        nlink = 2 + self._subdirs.get(entry.ino, 0) if entry.is_dir else 1
        return Attr(ino=entry.ino, mode=entry.mode, nlink=nlink, uid=entry.uid, gid=entry.gid,
                    size=size, atime_ns=mtime, mtime_ns=mtime, ctime_ns=entry.ctime_ns)

    def walk(self, entry: Entry) -> Iterator[Entry]:
        """Every file at or below ``entry``."""
        if not entry.is_dir:
            yield entry
            return
        stack = [entry.ino]
        while stack:
            for child in self.children.get(stack.pop(), {}).values():
                sub = self.entries[child]
                if sub.is_dir:
                    stack.append(child)
                else:
                    yield sub

    @staticmethod
    def now_ns() -> int:
        return time.time_ns()

    def touch_dir(self, directory: Entry) -> None:
        directory.mtime_ns = directory.ctime_ns = self.now_ns()

    # ------------------------------------------------------------------ names

    def load(self, entries: list[Entry]) -> None:
        """Recovery: take every journaled entry at once (parents may come after children)."""
        for entry in entries:
            self.entries[entry.ino] = entry
            if entry.is_dir:
                self.children.setdefault(entry.ino, {})
        for entry in entries:
            if entry.ino != ROOT_INO:
                self._link_name(entry)

    def add(self, entry: Entry) -> None:
        """A new entry (its ino assigned) under its parent."""
        self.entries[entry.ino] = entry
        if entry.is_dir:
            self.children[entry.ino] = {}
        self._link_name(entry)

    def unlink_name(self, entry: Entry) -> None:
        """Take ``entry``'s name out of its directory (the entry itself may live on)."""
        del self.children[entry.parent][entry.name]
        self._index(entry, -1)

    def move(self, entry: Entry, parent: int, name: str) -> None:
        self.unlink_name(entry)
        entry.parent, entry.name = parent, name
        self._link_name(entry)

    def remove_dir(self, directory: Entry) -> None:
        """Remove an empty directory: its name, its entry and its journal row."""
        self.unlink_name(directory)
        del self.children[directory.ino]
        del self.entries[directory.ino]
        self.journal.delete(directory.ino)

    def _link_name(self, entry: Entry) -> None:
        self.children.setdefault(entry.parent, {})[entry.name] = entry.ino
        self._index(entry, 1)

    def _index(self, entry: Entry, delta: int) -> None:
        if entry.is_dir:
            self._subdirs[entry.parent] = self._subdirs.get(entry.parent, 0) + delta
            if fnmatch.fnmatchcase(entry.name, self._pattern):
                if delta > 0:
                    self.checkpoint_dirs.add(entry.ino)
                else:
                    self.checkpoint_dirs.discard(entry.ino)
        elif self._is_marker(entry.name):
            left = self.marker_parents.get(entry.parent, 0) + delta
            if left > 0:
                self.marker_parents[entry.parent] = left
            else:
                self.marker_parents.pop(entry.parent, None)

"""Which dirty files other nodes hold: the small index the writers push (ANNOUNCE).

A writer announces every file it replicates (``peers`` level) to every member when its fsync
replicates it, and announces it gone once it is in the store or deleted; renames follow. A
node's index is what it was told, keyed by path, the newest version winning. It is a hint: a
read that the origin and every holder fail falls through to the object store.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace

__all__ = ["IndexEntry", "PeerIndex", "moved_key"]


def moved_key(key: str, old: str, new: str) -> str | None:
    """Where ``key`` is after a rename of ``old`` to ``new`` (a file, or a directory prefix
    ending in '/'); None if the rename does not concern it."""
    if key == old:
        return new
    if old.endswith("/") and key.startswith(old):
        return new + key[len(old):]
    return None


@dataclass(frozen=True)
class IndexEntry:
    key: str
    origin: str
    size: int
    mtime_ns: int
    version: int
    holders: tuple[str, ...]


class PeerIndex:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, IndexEntry] = {}

    def put(self, entry: IndexEntry) -> None:
        with self._lock:
            old = self._entries.get(entry.key)
            if old is None or old.version <= entry.version:
                self._entries[entry.key] = entry

    def gone(self, origin: str, key: str, upto: int | None = None) -> None:
        with self._lock:
            old = self._entries.get(key)
            if old is not None and old.origin == origin and (upto is None
                                                             or old.version <= upto):
                del self._entries[key]

    def rename(self, origin: str, old: str, new: str) -> None:
        with self._lock:
            for key, entry in list(self._entries.items()):
                target = moved_key(key, old, new)
                if entry.origin != origin or target is None:
                    continue
                del self._entries[key]
                self._entries[target] = replace(entry, key=target)

    def lookup(self, key: str) -> IndexEntry | None:
        with self._lock:
            return self._entries.get(key)

    def under(self, prefix: str) -> tuple[list[IndexEntry], set[str]]:
        """Files directly under ``prefix`` ('' or ending in '/') and the sub-directories
        (as ``prefix + name + '/'``) that hold some."""
        files, dirs = [], set()
        with self._lock:
            for key, entry in self._entries.items():
                if not key.startswith(prefix):
                    continue
                rest = key[len(prefix):]
                if "/" in rest:
                    dirs.add(prefix + rest.split("/", 1)[0] + "/")
                else:
                    files.append(entry)
        return files, dirs

    def under_all(self, prefix: str) -> list[IndexEntry]:
        """Every file at any depth below ``prefix``."""
        with self._lock:
            return [e for k, e in self._entries.items() if k.startswith(prefix)]

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

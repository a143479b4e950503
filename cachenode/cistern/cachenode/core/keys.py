"""Key ownership: who may write, move or delete each object key (docs/dev/cachenode.md, 2).

Every object key under the prefix that the cache knows of is owned by exactly one of
  - a live entry whose ``remote_key`` is that key (it will overwrite, move or delete it),
  - a tombstone (the flusher will delete it),
  - an in-flight upload, copy or delete that reserved it (``DELETE_RESERVATION`` for deletes).
A file is written to its desired key only when it owns the key or nobody does.
"""

from __future__ import annotations

from cistern.cachenode.core.tree import Tree
from cistern.cachenode.journal import Entry

__all__ = ["DELETE_RESERVATION", "Keys"]

DELETE_RESERVATION = -1
"""The owner recorded for a key while the flusher deletes it."""


class Keys:
    """Owners and tombstones; every method runs under the tree's lock."""

    def __init__(self, tree: Tree) -> None:
        self._tree = tree
        self.owners: dict[str, int] = {}
        self.tombstones: set[str] = set()

    def load(self, entries: list[Entry], tombstones: set[str]) -> None:
        for entry in entries:
            if entry.remote_key:
                self.owners[entry.remote_key] = entry.ino
        self.tombstones = tombstones

    def own(self, key: str, ino: int) -> None:
        self.owners[key] = ino

    def owner(self, key: str) -> int | None:
        return self.owners.get(key)

    def known(self, key: str) -> bool:
        """The cache already accounts for ``key`` (a listing must not import it again)."""
        return key in self.owners or key in self.tombstones

    def disown(self, key: str, ino: int) -> None:
        """Drop ``ino``'s reservation of ``key`` (an upload or copy that did not land)."""
        if self.owners.get(key) == ino:
            del self.owners[key]

    def add_tombstone(self, key: str) -> None:
        self.tombstones.add(key)
        self._tree.journal.add_tombstone(key)
        self._tree.changed.notify_all()

    def remove_tombstone(self, key: str) -> None:
        self.tombstones.discard(key)
        self._tree.journal.remove_tombstone(key)

    def release(self, key: str) -> None:
        """``key`` lost its owner: hand it to the entry that now wants it, or delete it."""
        self.owners.pop(key, None)
        wanting = self._tree.resolve(key)
        if wanting is not None and not wanting.is_dir and wanting.remote_key is None:
            wanting.remote_key = key
            self.owners[key] = wanting.ino
            self._tree.journal.update(wanting)
        else:
            self.add_tombstone(key)

    def claim_tombstone(self, entry: Entry) -> None:
        """A new or renamed file landed on a key scheduled for deletion: overwrite it instead."""
        if not self.tombstones or entry.remote_key is not None:
            return  # the usual case, and a create's hot path: no key to compute
        key = self._tree.key_of(entry)
        if entry.remote_key is None and key in self.tombstones:
            self.remove_tombstone(key)
            entry.remote_key = key
            self.owners[key] = entry.ino

    def forget_unlinked(self, entry: Entry, reserved: str | None) -> None:
        """An entry removed while its upload or move ran: give up every key it holds."""
        for key in {entry.remote_key, reserved} - {None}:
            if key is not None and self.owners.get(key) == entry.ino:
                self.release(key)
        entry.remote_key = None
        if entry.opens == 0:
            self._tree.entries.pop(entry.ino, None)

"""Namespace operations: lookup, readdir, mkdir, create, unlink, rmdir, rename.

Every operation that looks into a directory lists it from the store first (read-through), then
changes the tree and the journal in one transaction under the lock. Removing or renaming
uploaded objects never touches the store here: keys are released (or claimed) and the flusher
copies and deletes later (invariant 2).
"""

from __future__ import annotations

import errno
import os
import stat

from cistern.cachenode.core.admission import Admission
from cistern.cachenode.core.datafiles import DataFiles
from cistern.cachenode.core.keys import Keys
from cistern.cachenode.core.model import (
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    ROOT_INO,
    Attr,
    Handle,
    check_name,
    err,
)
from cistern.cachenode.core.openfiles import OpenFiles
from cistern.cachenode.core.readthrough import ReadThrough
from cistern.cachenode.core.tree import Tree
from cistern.cachenode.core.workqueue import WorkQueue
from cistern.cachenode.journal import CLEAN, DIR, DIRTY, Entry

__all__ = ["Namespace"]


class Namespace:
    def __init__(self, tree: Tree, keys: Keys, queue: WorkQueue, datafiles: DataFiles,
                 readthrough: ReadThrough, admission: Admission, files: OpenFiles) -> None:
        self._tree = tree
        self._keys = keys
        self._queue = queue
        self._data = datafiles
        self._readthrough = readthrough
        self._admission = admission
        self._files = files

    def _listed_dir(self, ino: int) -> Entry:
        with self._tree.lock:
            directory = self._tree.dir(ino)
        if self._readthrough.needs_listing(directory):  # (pc: or due for revalidation)
            self._readthrough.ensure_listed(directory)
        return directory

    # ------------------------------------------------------------------ reading

    def find(self, parent: int, name: str) -> Attr | None:
        """``lookup`` that answers None for a missing name (no exception on the hot path)."""
        tree = self._tree
        with tree.lock:  # the usual case: a listed directory, one pass under the lock
            directory = tree.entries.get(parent)
            if directory is not None and directory.is_dir \
                    and not self._readthrough.needs_listing(directory) \
                    and name not in (".", ".."):
                ino = tree.child(parent, name)
                return None if ino is None else tree.attr(tree.entries[ino])
        directory = self._listed_dir(parent)
        with tree.lock:
            if name == ".":
                return tree.attr(directory)
            if name == "..":
                return tree.attr(tree.get(directory.parent))
            ino = tree.child(parent, name)
            return None if ino is None else tree.attr(tree.entries[ino])

    def readdir(self, ino: int) -> list[tuple[str, Attr]]:
        self._listed_dir(ino)
        tree = self._tree
        with tree.lock:
            children = tree.children.get(ino, {})
            return [(name, tree.attr(tree.entries[c])) for name, c in sorted(children.items())]

    # ------------------------------------------------------------------ creating

    def _new_entry(self, parent: Entry, name: str, *, is_dir: bool, mode: int, uid: int,
                   gid: int) -> Entry:
        check_name(name)
        if self._tree.child(parent.ino, name) is not None:
            raise err(errno.EEXIST)
        now = self._tree.now_ns()
        kind = stat.S_IFDIR if is_dir else stat.S_IFREG
        return Entry(ino=0, parent=parent.ino, name=name, is_dir=is_dir,
                     mode=kind | (mode & 0o7777), uid=uid, gid=gid, size=0, mtime_ns=now,
                     ctime_ns=now, state=DIR if is_dir else DIRTY, local=True, listed=True)

    def mkdir(self, parent: int, name: str, mode: int, uid: int, gid: int) -> Attr:
        directory = self._listed_dir(parent)
        tree = self._tree
        with tree.lock, tree.journal.transaction():
            entry = self._new_entry(directory, name, is_dir=True, mode=mode, uid=uid, gid=gid)
            entry.ino = tree.journal.insert(entry)
            tree.add(entry)
            tree.touch_dir(directory)
            return tree.attr(entry)

    def create(self, parent: int, name: str, mode: int, flags: int, uid: int,
               gid: int) -> tuple[Handle, Attr]:
        directory = self._listed_dir(parent)
        self._admission.admit(new_file=True)
        tree, journal = self._tree, self._tree.journal
        with tree.lock:
            entry = self._new_entry(directory, name, is_dir=False, mode=mode, uid=uid, gid=gid)
            spare = self._data.take_spare()
            if spare is not None:
                entry.ino, entry.fd = spare
                try:
                    journal.log_insert(entry)  # one append, no commit (journal.py)
                except BaseException:
                    self._data.put_back(spare)
                    raise
            else:
                entry.ino = journal.insert(entry)
                try:
                    entry.fd = os.open(self._data.create_path(entry.ino),
                                       os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
                except OSError:
                    journal.delete(entry.ino)
                    raise
            tree.add(entry)
            self._keys.claim_tombstone(entry)
            if entry.remote_key:
                journal.update(entry)
            tree.touch_dir(directory)
            handle = self._files.open_handle(entry, flags | os.O_RDWR, writable=True)
            # Empty and just made: its attributes need no fstat of the data file.
            return handle, Attr(ino=entry.ino, mode=entry.mode, nlink=1, uid=entry.uid,
                                gid=entry.gid, size=0, atime_ns=entry.mtime_ns,
                                mtime_ns=entry.mtime_ns, ctime_ns=entry.ctime_ns)

    # ------------------------------------------------------------------ removing

    def unlink(self, parent: int, name: str) -> None:
        directory = self._listed_dir(parent)
        tree = self._tree
        with tree.lock, tree.journal.transaction():
            ino = tree.child(parent, name)
            if ino is None:
                raise err(errno.ENOENT)
            entry = tree.entries[ino]
            if entry.is_dir:
                raise err(errno.EISDIR)
            self.remove_file(entry)
            tree.touch_dir(directory)

    def remove_file(self, entry: Entry) -> None:
        """Forget a file: its name now, its entry once nobody has it open or in flight."""
        tree = self._tree
        tree.unlink_name(entry)
        self._queue.discard(entry)
        if entry.state == DIRTY:
            tree.dirty_bytes -= entry.size
        elif entry.state == CLEAN:
            tree.clean_bytes -= entry.size
        if entry.remote_key is not None and not entry.in_flight:
            self._keys.release(entry.remote_key)
        entry.unlinked = True
        tree.journal.delete(entry.ino)
        if entry.local:
            self._data.path(entry.ino).unlink(missing_ok=True)
        if entry.opens == 0 and not entry.in_flight:
            tree.entries.pop(entry.ino, None)
        tree.changed.notify_all()

    def remove_tree(self, directory: Entry) -> None:
        """Remove a directory and everything below it (retention in the store)."""
        tree = self._tree
        for child in list(tree.children.get(directory.ino, {}).values()):
            entry = tree.entries[child]
            if entry.is_dir:
                self.remove_tree(entry)
            else:
                self.remove_file(entry)
        tree.remove_dir(directory)

    def rmdir(self, parent: int, name: str) -> None:
        tree = self._tree
        with tree.lock:
            directory = tree.dir(parent)
            ino = tree.child(parent, name)
            if ino is None:
                raise err(errno.ENOENT)
            target = tree.entries[ino]
            if not target.is_dir:
                raise err(errno.ENOTDIR)
        self._readthrough.ensure_listed(target)
        with tree.lock, tree.journal.transaction():
            if tree.children.get(ino):
                raise err(errno.ENOTEMPTY)
            tree.remove_dir(target)
            tree.touch_dir(directory)

    # ------------------------------------------------------------------ renaming

    def rename(self, parent_old: int, old: str, parent_new: int, new: str,
               flags: int = 0) -> None:
        if flags & RENAME_EXCHANGE or flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE):
            raise err(errno.EINVAL, "RENAME_EXCHANGE is not supported")
        check_name(new)
        tree = self._tree
        with tree.lock:
            src_dir, dst_dir = tree.dir(parent_old), tree.dir(parent_new)
        self._readthrough.ensure_listed(src_dir)
        self._readthrough.ensure_listed(dst_dir)
        with tree.lock:
            ino = tree.child(parent_old, old)
            if ino is None:
                raise err(errno.ENOENT)
            moving = tree.entries[ino]
        if moving.is_dir:
            self._readthrough.ensure_subtree_listed(moving)
        with tree.lock, tree.journal.transaction():
            ino = tree.child(parent_old, old)
            if ino is None or ino != moving.ino:
                raise err(errno.ENOENT)
            if parent_old == parent_new and old == new:
                return
            if moving.is_dir:
                ancestor = dst_dir
                while True:
                    if ancestor.ino == moving.ino:
                        raise err(errno.EINVAL, "cannot move a directory into itself")
                    if ancestor.ino == ROOT_INO:
                        break
                    ancestor = tree.entries[ancestor.parent]
            existing_ino = tree.child(parent_new, new)
            if existing_ino is not None:
                self._replace(tree.entries[existing_ino], moving, flags)
            tree.move(moving, parent_new, new)
            moving.ctime_ns = tree.now_ns()
            tree.journal.update(moving)
            tree.touch_dir(src_dir)
            tree.touch_dir(dst_dir)
            for entry in tree.walk(moving):
                self._keys.claim_tombstone(entry)
                if self._queue.needs_work(entry):
                    if entry.state != DIRTY or entry.writers == 0:
                        self._queue.schedule(entry, bump=False)
                    tree.journal.update(entry)

    def _replace(self, existing: Entry, moving: Entry, flags: int) -> None:
        """rename(2) onto an existing name: POSIX says which kinds may replace which."""
        if flags & RENAME_NOREPLACE:
            raise err(errno.EEXIST)
        if existing.is_dir and not moving.is_dir:
            raise err(errno.EISDIR)
        if not existing.is_dir and moving.is_dir:
            raise err(errno.ENOTDIR)
        if existing.is_dir:
            self._readthrough.ensure_listed(existing)
            if self._tree.children.get(existing.ino):
                raise err(errno.ENOTEMPTY)
            self._tree.remove_dir(existing)
        else:
            self.remove_file(existing)

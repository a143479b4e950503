"""Read-through: the store's listing imported into the namespace, and fetches on open.

The journal is an overlay on the object store: a directory is listed from the store the first
time it is looked at (local entries win over the store's), and a REMOTE file is copied into
the cache when it is opened. Listing failures never fail a writer: local entries are shown
and the directory is listed again later.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
import time
from typing import Protocol

from cistern.cachenode.core.datafiles import DataFiles
from cistern.cachenode.core.keys import Keys
from cistern.cachenode.core.model import err
from cistern.cachenode.core.tree import Tree
from cistern.cachenode.core.workqueue import WorkQueue
from cistern.cachenode.journal import CLEAN, DIR, REMOTE, Entry
from cistern.cachenode.objectmeta import mode_from_metadata  # issue 13: no setuid
from cistern.cachenode.store import ObjectInfo, StoreError

__all__ = ["ReadThrough", "ReadThroughStore"]

log = logging.getLogger(__name__)

LIST_AGAIN_AFTER = 15.0
"""Seconds before a directory whose listing failed is listed again."""


class ReadThroughStore(Protocol):
    """What the read path needs from the store. The daemon passes its ``StoreClient``, which
    paces, retries (briefly for listings, longer for fetches) and counts these requests like
    the flusher's; a bare ``ObjectStore`` also fits (tests), without retries."""

    def list_dir(self, prefix: str) -> tuple[list[ObjectInfo], list[str]]: ...

    def download(self, key: str, fd: int) -> ObjectInfo: ...

    def head(self, key: str) -> ObjectInfo: ...


class ReadThrough:
    def __init__(self, tree: Tree, keys: Keys, datafiles: DataFiles, queue: WorkQueue,
                 store: ReadThroughStore, revalidate_after: float | None = None) -> None:
        self._tree = tree
        self._revalidate_after = revalidate_after
        self._queue = queue
        self._keys = keys
        self._files = datafiles
        self.store = store
        self._list_retry_at: dict[int, float] = {}
        self._listed_at: dict[int, float] = {}
        """When this process last listed each directory (runtime only: after a restart the
        first look lists again, when ``revalidateAfter`` is set)."""

    # ------------------------------------------------------------------ listing

    def needs_listing(self, entry: Entry) -> bool:
        """Cheap check for the namespace's fast paths: never listed, or due again."""
        return not entry.listed or (
            self._revalidate_after is not None
            and time.monotonic() - self._listed_at.get(entry.ino, -1e18)
            >= self._revalidate_after)

    def ensure_listed(self, entry: Entry) -> None:
        """Import the store's view of a directory the first time it is looked at, and again
        ``revalidateAfter`` after the last listing (or on first use after a restart)."""
        now = time.monotonic()
        if now < self._list_retry_at.get(entry.ino, 0.0):
            return
        if entry.listed and (self._revalidate_after is None
                             or now - self._listed_at.get(entry.ino, -1e18)
                             < self._revalidate_after):
            return
        tree = self._tree
        with tree.lock:
            relist = entry.listed
            prefix = tree.key_of(entry)
            # What may be merged with the listing: taken before it, so that an entry whose
            # object this node changes meanwhile (upload, move, delete) is left alone.
            known = self._mergeable(entry) if relist else {}
        prefix = f"{prefix}/" if prefix else ""
        try:
            files, dirs = self.store.list_dir(prefix)
        except StoreError as exc:
            # Writers must not fail because the store is down: serve what is known locally
            # and list again later. The local entries win over the store's when it returns.
            self._list_retry_at[entry.ino] = time.monotonic() + LIST_AGAIN_AFTER
            log.warning("cannot list %s/ in the object store (%s); showing local entries "
                        "only for now", prefix.rstrip("/") or "", exc)
            return
        self._list_retry_at.pop(entry.ino, None)
        with tree.lock, tree.journal.transaction():
            if entry.listed != relist or entry.ino not in tree.entries:
                return  # listed by another thread meanwhile, or gone
            self._listed_at[entry.ino] = now
            children = tree.children.setdefault(entry.ino, {})
            if relist:
                self._merge(entry, known, {info.key: info for info in files},
                            {d[len(prefix):].rstrip("/") for d in dirs})
            for sub in dirs:
                name = sub[len(prefix):].rstrip("/")
                if name and "/" not in name and name not in children:
                    self._import(entry, name, None)
            for info in files:
                name = info.key[len(prefix):]
                if name and "/" not in name and name not in children \
                        and not self._keys.known(info.key):
                    self._import(entry, name, info)
            if not relist:
                entry.listed = True
                tree.journal.update(entry)

    # ------------------------------------------------------------------ listing again

    def _mergeable(self, directory: Entry) -> dict[int, tuple[str | None, str | None]]:
        """Children a new listing may change: files with an object and no work, nobody's
        open, and directories imported from the store and never listed; by ino, with the
        key and ETag they have now."""
        tree = self._tree
        out: dict[int, tuple[str | None, str | None]] = {}
        for ino in tree.children.get(directory.ino, {}).values():
            child = tree.entries[ino]
            if self._settled(child):
                out[ino] = (child.remote_key, child.etag)
        return out

    def _settled(self, entry: Entry) -> bool:
        if entry.is_dir:
            return not entry.local and not entry.listed \
                and not self._tree.children.get(entry.ino)
        return entry.state in (CLEAN, REMOTE) and entry.remote_key is not None \
            and entry.remote_key == self._tree.key_of(entry) and not entry.opens \
            and not entry.in_flight and entry.ino not in self._queue.pending

    def _merge(self, directory: Entry, known: dict[int, tuple[str | None, str | None]],
               objects: dict[str, ObjectInfo], subdirs: set[str]) -> None:
        """Coherence: what another writer removed or replaced since the last listing. Only
        entries that were settled before the listing and still are, unchanged, are touched:
        dirty data (and anything in flight, pending, open) is never dropped."""
        tree = self._tree
        for name, ino in list(tree.children.get(directory.ino, {}).items()):
            child = tree.entries[ino]
            if known.get(ino, (0, 0)) != (child.remote_key, child.etag) \
                    or not self._settled(child):
                continue
            if child.is_dir:
                if name not in subdirs:
                    tree.remove_dir(child)
                continue
            assert child.remote_key is not None
            info = objects.get(child.remote_key)
            if info is None:
                log.info("%s was removed from the store by another writer", child.remote_key)
                self._forget(child)
            elif info.etag and info.etag != child.etag:
                log.info("%s changed in the store (ETag %s, was %s)", child.remote_key,
                         info.etag, child.etag)
                if child.local:
                    self._files.drop_local(child, "changed")
                child.size = child.remote_size = info.size
                child.mtime_ns = int(info.mtime * 1e9)
                child.etag = info.etag
                tree.journal.update(child)

    def _forget(self, entry: Entry) -> None:
        """A settled file whose object is gone: it leaves the namespace (nothing to delete)."""
        tree = self._tree
        tree.unlink_name(entry)
        self._queue.discard(entry)
        if entry.state == CLEAN:
            tree.clean_bytes -= entry.size
        if entry.remote_key is not None:
            self._keys.disown(entry.remote_key, entry.ino)
        entry.unlinked = True
        tree.journal.delete(entry.ino)
        if entry.local:
            self._files.path(entry.ino).unlink(missing_ok=True)
        tree.entries.pop(entry.ino, None)

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
                        local=False, remote_key=info.key, remote_size=info.size,
                        etag=info.etag or None)
        new.ino = self._tree.journal.insert(new)
        self._tree.add(new)
        if new.remote_key:
            self._keys.own(new.remote_key, new.ino)
        return new

    def ensure_subtree_listed(self, entry: Entry) -> None:
        """Before a directory rename or removal: know every object below it."""
        if not entry.is_dir:
            return
        self.ensure_listed(entry)
        tree = self._tree
        with tree.lock:
            subdirs = [tree.entries[c] for c in tree.children.get(entry.ino, {}).values()
                       if tree.entries[c].is_dir]
        for sub in subdirs:
            self.ensure_subtree_listed(sub)

    # ------------------------------------------------------------------ fetch

    def revalidate(self, entry: Entry) -> None:
        """Coherence: before an open, check a CLEAN local copy not checked for
        ``revalidateAfter`` (or since the start) against the store's ETag; if another writer
        changed the object, drop the copy (REMOTE) so the open fetches theirs. Only CLEAN
        copies nobody has open and that need no work: dirty data is never replaced. A failed
        check serves the local copy (writers and readers never see S3 errors for it)."""
        after = self._revalidate_after
        if after is None:
            return
        tree = self._tree
        now = time.monotonic()
        with tree.lock:
            if entry.state != CLEAN or not entry.local or entry.opens or entry.in_flight \
                    or entry.remote_key is None or now - entry.validated < after:
                return
            key, known = entry.remote_key, entry.etag
        try:
            info = self.store.head(key)
        except (StoreError, FileNotFoundError) as exc:
            log.warning("revalidation of %s failed, serving the local copy: %s", key, exc)
            return
        with tree.lock:
            entry.validated = now
            if not info.etag or info.etag == known:
                return
            if entry.state == CLEAN and entry.local and not entry.opens and not entry.in_flight \
                    and entry.remote_key == key and entry.etag == known \
                    and entry.ino not in self._queue.pending:
                log.info("%s changed in the store (ETag %s, was %s); fetched again",
                         key, info.etag, known)
                self._files.drop_local(entry, "changed")

    def fetch(self, entry: Entry) -> None:
        """Copy a REMOTE file into the cache (serialised per file)."""
        tree = self._tree
        with tree.lock:
            while entry.in_flight and not entry.local:
                tree.changed.wait(1.0)
            if entry.local:
                return
            key = entry.remote_key
            if key is None:
                raise err(errno.EIO, f"{tree.path_of(entry)} has neither data nor object")
            entry.in_flight = True
            self._queue.recount(entry)
        tmp = self._files.tmp_dir / f"fetch-{entry.ino}-{threading.get_ident()}"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            try:
                info = self.store.download(key, fd)
            except FileNotFoundError as exc:
                raise err(errno.ENOENT, f"{key} vanished from the object store") from exc
            except StoreError as exc:
                log.error("fetch %s failed: %s", key, exc)
                raise err(errno.EIO, str(exc)) from exc
            os.fsync(fd)
            with tree.lock:
                os.replace(tmp, self._files.create_path(entry.ino))
                # Rule: a CLEAN row is never durable before its data file is.
                self._files.sync_dir(self._files.path(entry.ino).parent)
                entry.local = True
                entry.state = CLEAN
                entry.last_access = time.monotonic()
                entry.size = entry.remote_size = info.size
                entry.etag = info.etag or None
                entry.validated = time.monotonic()
                apply_metadata(entry, info.metadata)
                tree.clean_bytes += info.size
                tree.journal.update(entry)
                tree.on_event("fetched_bytes", info.size)
        finally:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            with tree.lock:
                entry.in_flight = False
                self._queue.recount(entry)
                tree.changed.notify_all()


def apply_metadata(entry: Entry, metadata: dict[str, str]) -> None:
    """Mode, owner and mtime the flusher stored with the object."""
    try:
        if "mode" in metadata:
            entry.mode = stat.S_IFREG | mode_from_metadata(metadata["mode"])  # issue 13
        if "uid" in metadata:
            entry.uid = int(metadata["uid"])
        if "gid" in metadata:
            entry.gid = int(metadata["gid"])
        if "mtime-ns" in metadata:
            entry.mtime_ns = int(metadata["mtime-ns"])
    except ValueError:
        log.warning("ignoring malformed object metadata %r", metadata)

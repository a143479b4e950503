"""Crash recovery: rebuild the in-memory state from the journal and the data files.

Runs once, before the core serves anything; each row of the crash-recovery table in
docs/dev/cachenode.md is handled here (see the comments that name them).
"""

from __future__ import annotations

import logging
import os
import stat
import time

from cistern.cachenode.core.datafiles import DataFiles
from cistern.cachenode.core.keys import Keys
from cistern.cachenode.core.model import ROOT_INO
from cistern.cachenode.core.tree import Tree
from cistern.cachenode.core.workqueue import WorkQueue
from cistern.cachenode.journal import CLEAN, DIR, DIRTY, REMOTE, Entry

__all__ = ["recover"]

log = logging.getLogger(__name__)


def recover(tree: Tree, keys: Keys, queue: WorkQueue, datafiles: DataFiles) -> None:
    """Load the journal into ``tree``, ``keys`` and ``queue`` and check the data files."""
    journal = tree.journal
    now_ns = time.time_ns()
    entries = journal.load()
    if not any(e.ino == ROOT_INO for e in entries):
        root = Entry(ino=ROOT_INO, parent=ROOT_INO, name="", is_dir=True,
                     mode=stat.S_IFDIR | 0o755, uid=os.getuid(), gid=os.getgid(), size=0,
                     mtime_ns=now_ns, ctime_ns=now_ns, state=DIR, local=True, listed=False)
        journal.insert(root)
        entries.append(root)
    tree.load(entries)
    keys.load(entries, journal.tombstones())
    known_data: set[str] = set()
    for entry in entries:
        if entry.is_dir or not entry.local:
            continue
        path = datafiles.path(entry.ino)
        try:
            st = path.stat()
        except FileNotFoundError:
            st = None
        if entry.state == DIRTY:
            if st is None:
                # Crash table: "file created, data file missing".
                datafiles.lose_local(entry, "dirty data file is missing")
                continue
            # Crash table: "during writes" / "after fsync": the data file is the truth.
            entry.size, entry.mtime_ns = st.st_size, st.st_mtime_ns
        elif entry.state == CLEAN and (st is None or st.st_size != entry.remote_size):
            # Crash table: "CLEAN copy truncated or missing".
            log.warning("cached copy of %s is missing or truncated; will fetch again",
                        tree.path_of(entry))
            entry.state, entry.local = REMOTE, False
            journal.update(entry)
            continue
        known_data.add(str(path))
    # Crash table: "data files with no entry".
    datafiles.remove_strays(known_data)
    for intent in journal.uploads():
        _recover_upload(tree, keys, queue, intent.ino, intent.key, intent.upload_id)
    now = time.monotonic()
    for entry in sorted(entries, key=lambda e: e.ino):
        entry.last_access = now
        if not entry.is_dir and entry.ino in tree.entries:  # (a lost file is gone)
            entry.seq = entry.dirty_seq = queue.next_seq()
            # Crash table: "rename ... copy not done" and every DIRTY file: queued again.
            if queue.needs_work(entry):
                queue.pending.add(entry.ino)
                queue.recount(entry)
            if entry.state == DIRTY:
                tree.dirty_bytes += entry.size
            elif entry.state == CLEAN:
                tree.clean_bytes += entry.size
    if queue.pending or keys.tombstones or queue.stale_uploads:
        log.info("recovered %d entries: %d need upload or move, %d deletes pending, "
                 "%d interrupted uploads to clean up", len(entries), len(queue.pending),
                 len(keys.tombstones), len(queue.stale_uploads))


def _recover_upload(tree: Tree, keys: Keys, queue: WorkQueue, ino: int, key: str,
                    upload_id: str | None) -> None:
    """Crash table: "during a single PUT / a multipart upload / before journaling CLEAN":
    the object may or may not exist, so the entry takes the key or a tombstone deletes it,
    and the flusher aborts the multipart upload."""
    queue.stale_uploads.append((key, upload_id))
    entry = tree.entries.get(ino)
    owner = keys.owner(key)
    if owner is not None and owner != ino:
        log.error("journal inconsistency: %s owned by %d and uploaded by %d", key, owner, ino)
    elif entry is not None and entry.remote_key is None and not entry.is_dir:
        entry.remote_key = key
        keys.own(key, ino)
        tree.journal.update(entry)
    elif entry is None or entry.remote_key != key:
        keys.add_tombstone(key)
    tree.journal.remove_upload(ino, key)

"""Crash recovery: rebuild the in-memory state from the journal and the data files.

Runs once, before the core serves anything; each row of the crash-recovery table in
docs/dev/cachenode.md is handled here (see the comments that name them).
"""

from __future__ import annotations

import logging
import os
import stat
import time
import uuid
from pathlib import Path

from cistern.cachenode.core.datafiles import DataFiles
from cistern.cachenode.core.keys import Keys
from cistern.cachenode.core.model import ROOT_INO
from cistern.cachenode.core.tree import Tree
from cistern.cachenode.core.workqueue import WorkQueue
from cistern.cachenode.journal import CLEAN, DIR, DIRTY, REMOTE, Entry

__all__ = ["incarnation", "keep_unsynced", "recover"]

log = logging.getLogger(__name__)


def incarnation(cache_dir: Path) -> str:
    """Names this boot and this mount of the cache's file system: if a restart sees the same
    one, the page cache survived (a daemon crash, not a power loss)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = uuid.uuid4().hex  # unknown: assume the worst on the next start
    return f"{boot}:{os.stat(cache_dir).st_dev}"


def recover(tree: Tree, keys: Keys, queue: WorkQueue, datafiles: DataFiles) -> None:
    """Load the journal into ``tree``, ``keys`` and ``queue`` and check the data files."""
    journal = tree.journal
    now_ns = time.time_ns()
    current = incarnation(datafiles.cache_dir)
    # Power-loss rule: after a daemon crash the page cache still holds every write, so dirty
    # data files are exactly what was written; after a power loss, only what was fsync'd is
    # known to be whole (see docs/dev/cachenode.md, "Power loss").
    page_cache_survived = journal.get_meta("incarnation") == current
    # Power-loss rule: the identity objects name their writer by is durable before any
    # upload (the sync at the end of recovery precedes the flusher's start).
    queue.cache_id = journal.get_meta("cache-id") or uuid.uuid4().hex
    journal.set_meta("cache-id", queue.cache_id)
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
    intents = journal.uploads()
    # Power-loss rule: an upload whose intent row is durable may have created the object
    # although its result never reached the journal; it counts as an object below.
    uploading = {intent.ino for intent in intents}
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
            whole = entry.synced and (st.st_size, st.st_mtime_ns) == (entry.size,
                                                                       entry.mtime_ns)
            has_object = entry.remote_key is not None or entry.ino in uploading
            if not (page_cache_survived or whole) and has_object:
                # Crash table: "during writes, before fsync (power loss)", with an object
                # (or an upload that may have made one).
                keep_unsynced(tree, datafiles, entry, path)
                continue
            # Crash table: "during writes" / "after fsync": the data file is the truth.
            entry.size, entry.mtime_ns = st.st_size, st.st_mtime_ns
            if not whole:
                # Rule: data is durable before it is uploaded (and before it is trusted
                # after the next crash).
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
                entry.synced = True
                journal.update(entry)
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
    for intent in intents:
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
    journal.set_meta("incarnation", current)
    journal.sync()
    if queue.pending or keys.tombstones or queue.stale_uploads:
        log.info("recovered %d entries: %d need upload or move, %d deletes pending, "
                 "%d interrupted uploads to clean up", len(entries), len(queue.pending),
                 len(keys.tombstones), len(queue.stale_uploads))


def keep_unsynced(tree: Tree, datafiles: DataFiles, entry: Entry, path: Path) -> None:
    """Power loss hit a file that has an object in the store while it held changes nobody
    fsync'd: what the disk holds may be torn (an O_TRUNC without its new data, a write half
    on disk). Rule: a crash state never replaces a good object, so the path shows the store's
    version again and the local data is kept aside, loudly."""
    lost = datafiles.cache_dir / "lost+found"
    lost.mkdir(exist_ok=True)
    kept = lost / f"{entry.ino}-{entry.name}"
    os.replace(path, kept)
    log.error("power loss: %s had changes that were never fsync'd; it shows the object "
              "store's version again, the data found on disk is kept in %s",
              tree.path_of(entry), kept)
    tree.on_event("unsynced_kept", 1)
    entry.state, entry.local, entry.synced = REMOTE, False, False
    if entry.remote_size is not None:
        entry.size = entry.remote_size
    tree.journal.update(entry)


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

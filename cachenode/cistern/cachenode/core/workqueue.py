"""The flusher's work queue: which entries need the store, in what order, and their results.

An entry is *pending* from the moment it needs work (DIRTY data, changed metadata, a rename of
an uploaded object) until the store has it under its final key. ``collect_work`` hands out
due work that is safe to run now (key ownership, commit markers last); ``finish_*`` journal
the results. The queue never talks to the store itself.
"""

from __future__ import annotations

import itertools
import logging
import os
import sqlite3
import time

from cistern.cachenode.core.datafiles import DataFiles
from cistern.cachenode.core.keys import DELETE_RESERVATION, Keys
from cistern.cachenode.core.model import (
    ROOT_INO,
    WRITER_KEY,
    DeleteWork,
    MoveWork,
    StreamWork,
    UploadWork,
    Work,
)
from cistern.cachenode.core.tree import Tree
from cistern.cachenode.journal import CLEAN, DIRTY, Entry
from cistern.cachenode.store import PreconditionFailed
from cistern.config import FlushPolicy

__all__ = ["WorkQueue"]

log = logging.getLogger(__name__)

_Counts = tuple[int, int, int, int]
"""One pending entry's share of the backlog: (dirty, uploading, move, open writer)."""
_ZERO: _Counts = (0, 0, 0, 0)


class WorkQueue:
    def __init__(self, tree: Tree, keys: Keys, datafiles: DataFiles,
                 policy: FlushPolicy) -> None:
        self._tree = tree
        self._keys = keys
        self._files = datafiles
        self._policy = policy
        self.pending: set[int] = set()
        self._seq = itertools.count(1)
        self._force_until_seq = 0
        self.stale_uploads: list[tuple[str, str | None]] = []
        """Uploads interrupted by the last stop: (key, multipart upload id) to clean up."""
        self._counts: _Counts = _ZERO
        self._counted: dict[int, _Counts] = {}
        self.journal_errors = 0
        """Journal writes that failed in the flusher's reports (e.g. disk full)."""
        self.cache_id = ""
        """This cache's identity (journaled at its first start, see ``recovery``); every
        object it writes names it with the entry (``WRITER_KEY``)."""

    def next_seq(self) -> int:
        return next(self._seq)

    # ------------------------------------------------------------------ becoming pending

    def needs_work(self, entry: Entry) -> bool:
        if entry.is_dir or entry.unlinked:
            return False
        if entry.state == DIRTY or entry.meta_dirty:
            return True
        return entry.remote_key is not None and entry.remote_key != self._tree.key_of(entry)

    def schedule(self, entry: Entry, delay: float | None = None, bump: bool = True) -> None:
        if self.needs_work(entry):
            if delay is None:
                # A commit marker is due at once (dur, issue 16): ``uploadDelay`` spares
                # temporary files a request, and a marker is the last file of a finished
                # checkpoint. It still waits for the files written before it
                # (``_marker_blocked``), so it only stops adding a second to every save.
                delay = 0.0 if self._policy.is_commit_marker(entry.name) \
                    else self._policy.upload_delay
            entry.due = time.monotonic() + delay
            if bump:
                entry.seq = self.next_seq()
            self.add_pending(entry)
            self._tree.changed.notify_all()

    def add_pending(self, entry: Entry) -> None:
        """``dirty_seq`` marks when the entry started to need work: a flush requested after
        that point must wait for it, whatever happens to the entry afterwards."""
        if entry.ino not in self.pending:
            entry.dirty_seq = self.next_seq()
            self.pending.add(entry.ino)
        self.recount(entry)

    def discard(self, entry: Entry) -> None:
        """``entry`` needs nothing from the store any more (or is gone)."""
        self.pending.discard(entry.ino)
        self.recount(entry)

    def recount(self, entry: Entry) -> None:
        """Keep the backlog counts (/status, /metrics) in step with one entry.

        Called wherever an entry joins or leaves the pending set or changes state, ``in_flight``
        or ``writers``, so ``pending_summary`` reads totals instead of walking the backlog.
        """
        live = entry.ino in self.pending and self._tree.entries.get(entry.ino) is entry
        new = (int(entry.state == DIRTY), int(entry.in_flight), int(entry.state != DIRTY),
               int(entry.writers > 0)) if live else _ZERO
        old = self._counted.pop(entry.ino, _ZERO)
        if live:
            self._counted[entry.ino] = new
        if new != old:
            a, b, c, d = self._counts
            self._counts = (a + new[0] - old[0], b + new[1] - old[1], c + new[2] - old[2],
                            d + new[3] - old[3])

    def mark_dirty(self, entry: Entry) -> None:
        """Journal DIRTY before the first byte changes, so a crash can never hide a write.

        Power-loss rule: if the file has an object in the store (or an upload that may make
        one), the change from CLEAN, or from "synced", is durable before the modifying
        operation is acknowledged; recovery then never takes a torn file for a whole one.
        """
        changed = entry.state != DIRTY or entry.synced
        if entry.state != DIRTY:
            if entry.state == CLEAN:
                self._tree.clean_bytes -= entry.size
            entry.state = DIRTY
            self._tree.dirty_bytes += entry.size
        entry.synced = False
        if changed:
            self._tree.journal.update(entry)
            if entry.remote_key is not None or entry.in_flight:
                self._tree.journal.sync()
        self.add_pending(entry)
        entry.due = float("inf")

    def mark_clean(self, entry: Entry, size: int) -> None:
        entry.state = CLEAN
        entry.remote_size = size
        entry.meta_dirty = False
        self._tree.dirty_bytes -= entry.size
        self._tree.clean_bytes += entry.size
        if not self.needs_work(entry):
            self.pending.discard(entry.ino)
        self.recount(entry)
        self._tree.journal.update(entry)

    def request_flush(self) -> int:
        """Make everything dirty now due immediately; return the sequence to wait for."""
        with self._tree.lock:
            self._force_until_seq = self.next_seq()
            self._tree.changed.notify_all()
            return self._force_until_seq

    # ------------------------------------------------------------------ what is left

    def pending_summary(self) -> dict[str, int]:
        """The backlog, from counts kept as entries change (no walk: a scrape is cheap)."""
        with self._tree.lock:
            dirty, uploading, moves, writers = self._counts
            deletes = len(self._keys.tombstones)
        return {"dirty_files": dirty, "uploading_files": uploading, "pending_moves": moves,
                "pending_deletes": deletes, "open_writers": writers}

    def count_by_walking(self) -> dict[str, int]:
        """``pending_summary`` computed the slow way: the reference its counts must equal."""
        with self._tree.lock:
            entries = self._tree.entries
            dirty = [entries[i] for i in self.pending if i in entries]
            return {
                "dirty_files": sum(1 for e in dirty if e.state == DIRTY),
                "uploading_files": sum(1 for e in dirty if e.in_flight),
                "pending_moves": sum(1 for e in dirty if e.state != DIRTY),
                "pending_deletes": len(self._keys.tombstones),
                "open_writers": sum(1 for e in dirty if e.writers),
            }

    def idle(self, upto_seq: int | None = None) -> bool:
        """True when nothing (or nothing changed before ``upto_seq``) waits for the store."""
        with self._tree.lock:
            if self._keys.tombstones or self.stale_uploads:
                return False
            for ino in self.pending:
                entry = self._tree.entries.get(ino)
                if entry is not None and (upto_seq is None or entry.dirty_seq <= upto_seq):
                    return False
            return True

    def wait_idle(self, timeout: float, upto_seq: int | None = None) -> bool:
        """Wait until ``idle(upto_seq)``; False if ``timeout`` seconds pass first."""
        deadline = time.monotonic() + timeout
        changed = self._tree.changed
        with changed:
            while not self.idle(upto_seq):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                changed.wait(min(left, 0.2))
        return True

    # ------------------------------------------------------------------ handing out work

    def _marker_blocked(self, entry: Entry) -> bool:
        """A commit marker waits for every file written before it below its directory."""
        is_marker = self._policy.is_commit_marker
        if not is_marker(entry.name):
            return False
        entries = self._tree.entries
        directory = entries.get(entry.parent)
        if directory is None:
            return False
        for ino in self.pending:
            other = entries.get(ino)
            if other is None or other is entry or other.dirty_seq > entry.seq:
                continue
            if is_marker(other.name) and other.parent == entry.parent:
                continue
            ancestor = other
            while ancestor.ino != ROOT_INO:
                ancestor = entries.get(ancestor.parent) or entries[ROOT_INO]
                if ancestor.ino == directory.ino:
                    return True
        return False

    def is_due(self, entry: Entry, now: float) -> bool:
        """Past ``uploadDelay`` or covered by a flush request."""
        return entry.dirty_seq <= self._force_until_seq or entry.due <= now

    def collect_work(self, limit: int, force: bool = False) -> list[Work]:
        """Hand the flusher up to ``limit`` operations that are due and safe to run now."""
        now = time.monotonic()
        out: list[Work] = []
        keys = self._keys
        with self._tree.lock:
            for key in sorted(keys.tombstones):
                if len(out) >= limit:
                    return out
                if keys.owner(key) is None:
                    keys.own(key, DELETE_RESERVATION)
                    out.append(DeleteWork(key))
            # Filter before sorting: during a burst of thousands of new files almost none is
            # due yet, and this runs on every wake-up of the flusher.
            due = []
            for ino in self.pending:
                entry = self._tree.entries.get(ino)
                if entry is None or entry.in_flight or entry.unlinked:
                    continue
                if entry.writers and entry.sync_wanted <= entry.durable_gen:
                    continue
                if not force and not self.is_due(entry, now):
                    continue
                due.append(entry)
            due.sort(key=lambda e: e.seq)
            for entry in due:
                if len(out) >= limit:
                    break
                work = self._start(entry)
                if work is not None:
                    out.append(work)
        return out

    def object_metadata(self, entry: Entry) -> dict[str, str]:
        """What an object of ``entry`` carries: its attributes and its writer."""
        return {"mode": oct(entry.mode & 0o7777), "uid": str(entry.uid),
                "gid": str(entry.gid), "mtime-ns": str(entry.mtime_ns),
                WRITER_KEY: f"{self.cache_id}:{entry.ino}"}

    @staticmethod
    def conditions(entry: Entry, key: str, owner: int | None) -> tuple[str | None, bool]:
        """Coherence: an upload of ``entry`` to ``key`` (whose owner was ``owner`` before it
        was reserved) overwrites only the version this node uploaded or saw (If-Match), and
        creates a key nobody here owns only if it is absent (If-None-Match)."""
        if_match = entry.etag if entry.remote_key == key else None
        return if_match, owner is None and entry.remote_key is None

    def _start(self, entry: Entry) -> Work | None:
        key = self._tree.key_of(entry)
        owner = self._keys.owner(key)
        if owner is not None and owner != entry.ino:
            return None
        if key in self._keys.tombstones:
            return None
        if self._marker_blocked(entry):
            return None
        metadata = self.object_metadata(entry)
        if entry.state == DIRTY:
            try:
                fd = os.open(self._files.path(entry.ino), os.O_RDONLY)
            except FileNotFoundError:
                self._files.lose_local(entry, "data file vanished before upload")
                self.recount(entry)
                return None
            size = os.fstat(fd).st_size
            self._tree.journal.add_upload(entry.ino, key)
            entry.in_flight = True
            self.recount(entry)
            self._keys.own(key, entry.ino)
            if_match, absent = self.conditions(entry, key, owner)
            return UploadWork(ino=entry.ino, key=key, gen=entry.gen, fd=fd, size=size,
                              metadata=metadata, path=self._tree.path_of(entry),
                              if_match=if_match, if_none_match=absent)
        if entry.remote_key is None:
            self.discard(entry)
            return None
        entry.in_flight = True
        self.recount(entry)
        self._keys.own(key, entry.ino)
        return MoveWork(ino=entry.ino, src=entry.remote_key, dst=key,
                        metadata=metadata if entry.meta_dirty else None)

    # ------------------------------------------------------------------ results

    def set_upload_id(self, work: UploadWork | StreamWork, upload_id: str) -> None:
        self._tree.journal.set_upload_id(work.ino, work.key, upload_id)

    def upload_source_current(self, work: UploadWork) -> bool:
        """Nobody opened the file for writing since ``work`` was handed out: what the
        flusher read from it is one version of the file, not a mix of two (a rewrite racing
        an upload must never leave a torn object in the store)."""
        with self._tree.lock:
            entry = self._tree.entries.get(work.ino)
            return entry is not None and not entry.unlinked and entry.gen == work.gen \
                and (entry.writers == 0 or entry.sync_wanted > entry.durable_gen)

    def prepare_upload(self, work: UploadWork) -> bool:
        """Called by the flusher before the first request of an upload; False if the file
        changed since (the upload is pointless and retried later). Rules: the data is
        durable before it is uploaded (else a power loss could leave an older or torn local
        file that recovery uploads over the newer object), and so is the upload intent (else
        nobody would abort a multipart upload the crash interrupted)."""
        if not self.upload_source_current(work):
            return False
        os.fsync(work.fd)
        self._files.sync_dir(self._files.path(work.ino).parent)
        st = os.fstat(work.fd)
        tree = self._tree
        with tree.lock:
            entry = tree.entries.get(work.ino)
            if entry is not None and entry.gen == work.gen and entry.writers == 0 \
                    and entry.state == DIRTY and not entry.unlinked \
                    and st.st_size == work.size:
                tree.dirty_bytes += st.st_size - entry.size
                entry.size, entry.mtime_ns = st.st_size, st.st_mtime_ns
                entry.synced = True
                tree.journal.update(entry)
        tree.journal.sync()
        return True

    def finish_upload(self, work: UploadWork, etag: str | None, error: Exception | None) -> None:
        tree = self._tree
        try:
            with tree.lock, tree.journal.transaction():
                entry = tree.entries.get(work.ino)
                try:
                    self._finish_upload(work, entry, error, etag)
                finally:
                    if entry is not None:
                        self.recount(entry)
        except (sqlite3.Error, OSError) as exc:
            self._journal_failed(work, exc)

    def _journal_failed(self, work: UploadWork, exc: Exception) -> None:
        """E.g. the cache disk is full. The transaction rolled back: the intent row is still
        journaled and the file still DIRTY there, so retrying the upload later (and a restart)
        both do the right thing. Nothing may stay in flight for ever."""
        tree = self._tree
        log.error("cannot journal the upload of %s (%s); it stays dirty and is uploaded again "
                  "later", work.path, exc)
        tree.on_event("journal_error", 1)
        with tree.lock:
            self.journal_errors += 1
            entry = tree.entries.get(work.ino)
            if entry is not None:
                if entry.state == CLEAN and not entry.unlinked:
                    # Undo the transition the journal did not take.
                    entry.state = DIRTY
                    tree.clean_bytes -= entry.size
                    tree.dirty_bytes += entry.size
                entry.in_flight = False
                entry.due = time.monotonic() + 5.0
                if not entry.unlinked:
                    self.add_pending(entry)
                self.recount(entry)
            tree.changed.notify_all()

    def _finish_upload(self, work: UploadWork, entry: Entry | None,
                       error: Exception | None, etag: str | None = None) -> None:
        tree, keys = self._tree, self._keys
        tree.journal.remove_upload(work.ino, work.key)
        if entry is None:
            keys.release(work.key)
            tree.changed.notify_all()
            return
        entry.in_flight = False
        if isinstance(error, PreconditionFailed) and not entry.unlinked:
            self._give_way(entry, work)
            return
        if error is not None:
            if entry.unlinked:
                keys.forget_unlinked(entry, work.key)
            elif entry.remote_key != work.key:
                # A failed PUT never lands and a failed multipart upload was aborted:
                # nothing of ours is at the key, so give up the reservation.
                keys.owners.pop(work.key, None)
            entry.due = time.monotonic() + 1.0
            tree.changed.notify_all()
            return
        old = entry.remote_key
        entry.remote_key = work.key
        entry.remote_size = work.size
        entry.etag = etag or None
        keys.own(work.key, entry.ino)
        entry.durable_gen = max(entry.durable_gen, work.gen)
        entry.streamed = work.size
        entry.durable_at = time.time()  # /status: when a checkpoint's last byte was durable
        if old is not None and old != work.key:
            keys.release(old)
        if entry.unlinked:
            keys.forget_unlinked(entry, None)
        elif entry.gen == work.gen and entry.writers == 0 and entry.state == DIRTY:
            self.mark_clean(entry, work.size)
        else:
            tree.journal.update(entry)
        tree.changed.notify_all()

    def _give_way(self, entry: Entry, work: UploadWork) -> None:
        """Coherence: another writer replaced the object this upload was conditional on. The
        flusher kept this version in the store under a conflict name; the path now gives way
        to the other writer's object: the copy becomes CLEAN and, if nobody has it open, is
        dropped (REMOTE) so the next open fetches theirs. ``etag`` keeps the version this node
        knew, so a later write of a copy it has not re-read conflicts again instead of
        overwriting. Written since: it stays DIRTY and its next upload meets the same test."""
        if entry.remote_key is None:  # If-None-Match: the key is the other writer's object
            entry.remote_key = work.key
        if entry.gen == work.gen and entry.writers == 0 and entry.state == DIRTY:
            self.mark_clean(entry, work.size)
            if entry.opens == 0 and entry.local and entry.ino not in self.pending:
                self._files.drop_local(entry, "conflict")
        else:
            entry.due = time.monotonic() + 1.0
            self._tree.journal.update(entry)
        self._tree.changed.notify_all()

    def finish_move(self, work: MoveWork, error: Exception | None) -> None:
        tree = self._tree
        with tree.lock, tree.journal.transaction():
            entry = tree.entries.get(work.ino)
            try:
                self._finish_move(work, entry, error)
            finally:
                if entry is not None:
                    self.recount(entry)

    def _finish_move(self, work: MoveWork, entry: Entry | None, error: Exception | None) -> None:
        tree, keys = self._tree, self._keys
        if entry is not None:
            entry.in_flight = False
        if entry is None:
            keys.release(work.dst)
        elif entry.unlinked:
            keys.forget_unlinked(entry, work.dst)
        elif error is not None:
            if isinstance(error, FileNotFoundError):
                log.error("object %s vanished from the store before it could be moved "
                          "to %s", work.src, work.dst)
                self._files.lose_local(entry, "source object is gone")
            if work.dst != work.src:
                keys.disown(work.dst, entry.ino)
            entry.due = time.monotonic() + 1.0
        else:
            old = entry.remote_key
            entry.remote_key = work.dst
            keys.own(work.dst, entry.ino)
            if work.metadata is not None:
                entry.meta_dirty = False
            if old is not None and old != work.dst:
                keys.release(old)
            if not self.needs_work(entry):
                self.pending.discard(entry.ino)
            tree.journal.update(entry)
        tree.changed.notify_all()

    def finish_delete(self, work: DeleteWork, error: Exception | None) -> None:
        tree, keys = self._tree, self._keys
        with tree.lock, tree.journal.transaction():
            keys.disown(work.key, DELETE_RESERVATION)
            if error is None:
                keys.remove_tombstone(work.key)
                wanting = tree.resolve(work.key)
                if wanting is not None and not wanting.is_dir and wanting.remote_key is None:
                    self.schedule(wanting, delay=0.0)
            tree.changed.notify_all()

    def take_stale_uploads(self) -> list[tuple[str, str | None]]:
        with self._tree.lock:
            stale, self.stale_uploads = self.stale_uploads, []
            return stale

    def return_stale_upload(self, key: str, upload_id: str | None) -> None:
        """The flusher could not clean up an interrupted upload: keep it for later."""
        with self._tree.lock:
            self.stale_uploads.append((key, upload_id))
            self._tree.changed.notify_all()

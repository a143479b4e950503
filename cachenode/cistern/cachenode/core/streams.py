"""Streaming uploads: large files go to the store while they are still being written.

A file written at a name that does not look temporary (``flush.streamExclude``), in
write-back mode, whose data file has reached ``multipartThreshold`` while a writer still has
it open, is handed to the flusher as a ``StreamWork``: the core journals an upload intent,
reserves the key and marks the entry in flight, exactly as for an ``UploadWork``
(invariants 2 and 3). The flusher sends full parts as they fill and asks ``state`` how far the
file has got; once it is closed and due (``uploadDelay``, a flush request), the flusher sends
the tail, checks every part against the final content (parts whose bytes changed are sent
again) and reports through ``WorkQueue.finish_upload`` with the generation and size it checked.

Nothing here trusts the write path to report writes: the passthrough front end never sees
them (the kernel writes the data file). A rewrite behind the upload front is caught when the
parts are checked at the end; a truncation below the front or a rename makes the flusher
abort the multipart upload and the file is uploaded again the ordinary way (``abandon``).

A file excluded only by its own temporary name (``model.pt.tmp``, ``flush.streamTempSuffixes``)
streams under its predicted final key (``model.pt``) when nothing at all holds that key: no
entry, no owner, no tombstone. A multipart upload is invisible until completed, so nothing is
at the wrong name meanwhile; ``state`` reports it closed only once it has been renamed to that
key. Renamed elsewhere, unlinked, or left at its temporary name until it is due
(``uploadDelay`` after close), the stream is abandoned: the upload is aborted and the key given
back without a tombstone (nothing of it ever was in the store), and the file takes the
ordinary path.
"""

from __future__ import annotations

import fnmatch
import os
import time
from dataclasses import dataclass

from cistern.cachenode.core.datafiles import DataFiles
from cistern.cachenode.core.keys import Keys
from cistern.cachenode.core.model import ROOT_INO, StreamWork, UploadWork
from cistern.cachenode.core.tree import Tree
from cistern.cachenode.core.workqueue import WorkQueue
from cistern.cachenode.journal import DIRTY, Entry
from cistern.config import FlushPolicy

__all__ = ["StreamState", "Streams"]


@dataclass(frozen=True, slots=True)
class StreamState:
    """Where a streamed file is now, read under the core lock."""

    size: int
    written: int
    """The allocated prefix of ``size`` (what a sequential writer has written; see
    ``_written``): parts are sent only below it while the file is open."""
    closed: bool
    """No writer has it open (and it has its final key): the stream may complete now."""
    gen: int
    gone: bool
    """Unlinked, renamed away from the stream's key, or no longer dirty: abandon the stream."""


class Streams:
    def __init__(self, tree: Tree, keys: Keys, queue: WorkQueue, datafiles: DataFiles,
                 policy: FlushPolicy) -> None:
        self._tree = tree
        self._keys = keys
        self._queue = queue
        self._files = datafiles
        self._policy = policy
        self.enabled = policy.streaming and policy.mode == "writeBack"

    def looks_temporary(self, entry: Entry) -> bool:
        """The file's name or a directory above it matches ``streamExclude``."""
        patterns = self._policy.stream_exclude
        entries = self._tree.entries
        node: Entry | None = entry
        while node is not None and node.ino != ROOT_INO:
            if any(fnmatch.fnmatchcase(node.name, p) for p in patterns):
                return True
            node = entries.get(node.parent)
        return False

    def final_name(self, entry: Entry) -> str | None:
        """The name a temporary file will be renamed to, if it may stream under it: its own
        name ends in a ``streamTempSuffixes`` suffix, the name without it is neither excluded
        nor a commit marker, and no directory above it is excluded."""
        name = entry.name
        final = next((name[:-len(s)] for s in self._policy.stream_temp_suffixes
                      if name.endswith(s) and len(name) > len(s)), None)
        if final is None or self._policy.is_commit_marker(final) \
                or any(fnmatch.fnmatchcase(final, p) for p in self._policy.stream_exclude):
            return None
        parent = self._tree.entries.get(entry.parent)
        if parent is None or self.looks_temporary(parent):
            return None
        return final

    def collect(self, limit: int) -> list[StreamWork]:
        """Start up to ``limit`` streams of files being written that have grown large."""
        if not self.enabled or limit <= 0:
            return []
        out: list[StreamWork] = []
        tree, queue = self._tree, self._queue
        with tree.lock:
            for ino in list(queue.pending):
                if len(out) >= limit:
                    break
                entry = tree.entries.get(ino)
                if (entry is None or entry.in_flight or entry.unlinked or entry.writers == 0
                        or entry.state != DIRTY or entry.fd < 0
                        or self._policy.is_commit_marker(entry.name)):
                    continue
                if _written(os.fstat(entry.fd)) < self._policy.multipart_threshold:
                    continue
                final: str | None = None
                if self.looks_temporary(entry):
                    final = self.final_name(entry)
                    if final is None or entry.remote_key is not None:
                        continue
                work = self._start(entry, final)
                if work is not None:
                    out.append(work)
        return out

    def _start(self, entry: Entry, final: str | None) -> StreamWork | None:
        key = self._tree.key_of(entry)
        temp_key = None
        if final is not None:
            temp_key, key = key, key[:len(key) - len(entry.name)] + final
            if self._keys.owner(key) is not None or self._tree.resolve(key) is not None:
                return None  # the rename would replace a file: stream only onto free keys
        owner = self._keys.owner(key)
        if (owner is not None and owner != entry.ino) or key in self._keys.tombstones:
            return None
        try:
            fd = os.open(self._files.path(entry.ino), os.O_RDONLY)
        except FileNotFoundError:
            return None
        metadata = self._queue.object_metadata(entry)  # (pc, issue 15: names the writer)
        self._tree.journal.add_upload(entry.ino, key)
        entry.in_flight = True
        entry.streamed = 0
        self._queue.recount(entry)
        self._keys.own(key, entry.ino)
        if_match, absent = self._queue.conditions(entry, key, owner)  # (pc, issue 15)
        return StreamWork(ino=entry.ino, key=key, fd=fd, metadata=metadata,
                          path=self._tree.path_of(entry), temp_key=temp_key,
                          if_match=if_match, if_none_match=absent)

    def state(self, work: StreamWork, streamed: int) -> StreamState:
        """How far the file has got; records ``streamed`` bytes sent for /status."""
        tree = self._tree
        with tree.lock:
            entry = tree.entries.get(work.ino)
            key = None if entry is None else tree.key_of(entry)
            if entry is None or entry.unlinked or entry.state != DIRTY \
                    or key not in (work.key, work.temp_key):
                return StreamState(0, 0, False, 0, True)
            # Closed: completed at once (no uploadDelay: its parts are in the store already).
            closed = entry.writers == 0
            if key != work.key:  # still at its temporary name: complete only after the rename
                if closed and self._queue.is_due(entry, time.monotonic()):
                    return StreamState(0, 0, False, 0, True)  # never renamed: abandon
                closed = False
            entry.streamed = streamed
            st = os.fstat(work.fd)
            return StreamState(st.st_size, _written(st), closed, entry.gen, False)

    def give_back_prediction(self, work: StreamWork) -> None:
        """An abandoned stream under a predicted key held only a reservation: nothing of it
        reached the store, so the key goes back without a tombstone (no DELETE). Call with the
        tree's lock held, right before ``finish_upload``."""
        entry = self._tree.entries.get(work.ino)
        if work.temp_key is not None and (entry is None or entry.remote_key != work.key):
            self._keys.disown(work.key, work.ino)

    @staticmethod
    def as_upload(work: StreamWork, gen: int, size: int) -> UploadWork:
        """The finished stream as the upload it amounts to (for ``finish_upload``)."""
        return UploadWork(ino=work.ino, key=work.key, gen=gen, fd=work.fd, size=size,
                          metadata=work.metadata, path=work.path)


def _written(st: os.stat_result) -> int:
    """Bytes a sequential writer has written: the size, unless the file has holes.

    A file extended by ``ftruncate`` (or ``lseek`` + write) and filled later is not written
    sequentially: its allocated blocks lag its size, and streaming waits for them. Wrong
    guesses cost bandwidth only — parts are checked against the final content anyway.
    """
    return min(st.st_size, st.st_blocks * 512)

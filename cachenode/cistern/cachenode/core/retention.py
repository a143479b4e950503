"""Eviction, TTL and checkpoint retention, and the checkpoint progress shown in /status.

Only CLEAN local copies that nobody has open and that need no work are ever dropped
(invariant 5); retention in the store deletes whole checkpoint directories whose files are
all in the store under their final keys.
"""

from __future__ import annotations

import logging
import os
import re
import time
from typing import Any

from cistern.cachenode.core.admission import Admission
from cistern.cachenode.core.datafiles import DataFiles
from cistern.cachenode.core.namespace import Namespace
from cistern.cachenode.core.readthrough import ReadThrough
from cistern.cachenode.core.tree import Tree
from cistern.cachenode.core.workqueue import WorkQueue
from cistern.cachenode.journal import CLEAN, DIRTY, Entry
from cistern.config import CacheConfig, FlushPolicy

__all__ = ["Retention"]

log = logging.getLogger(__name__)


def _natural(entry: Entry) -> tuple[object, ...]:
    """Sort key: the name with numbers compared as numbers, then the mtime."""
    parts = re.split(r"(\d+)", entry.name)
    return (tuple(int(p) if p.isdigit() else p for p in parts), entry.mtime_ns)


class Retention:
    def __init__(self, tree: Tree, queue: WorkQueue, datafiles: DataFiles,
                 readthrough: ReadThrough, namespace: Namespace, config: CacheConfig,
                 flush: FlushPolicy, store_keep_last: int | None,
                 admission: Admission) -> None:
        self._tree = tree
        self._queue = queue
        self._data = datafiles
        self._readthrough = readthrough
        self._namespace = namespace
        self._config = config
        self._flush = flush
        self._store_keep_last = store_keep_last
        self._admission = admission

    # ------------------------------------------------------------------ eviction and TTL

    def _droppable(self, entry: Entry) -> bool:
        return entry.state == CLEAN and entry.local and entry.opens == 0 \
            and not entry.in_flight and entry.ino not in self._queue.pending

    def evict(self, target_bytes: int, reason: str = "capacity") -> int:
        """Drop clean local copies (least recently used first) until usage <= target."""
        tree = self._tree
        freed = 0
        with tree.lock:
            if tree.dirty_bytes + tree.clean_bytes <= target_bytes:
                return 0
            candidates = sorted((e for e in tree.entries.values() if self._droppable(e)),
                                key=lambda e: e.last_access)
            for entry in candidates:
                if tree.dirty_bytes + tree.clean_bytes <= target_bytes:
                    break
                freed += self._data.drop_local(entry, reason)
        return freed

    def maintain(self) -> None:
        """Periodic housekeeping: watermark eviction, cache TTL, checkpoint retention."""
        cfg, tree = self._config, self._tree
        capacity = self._admission.capacity_bytes
        if tree.dirty_bytes + tree.clean_bytes > capacity * cfg.high_watermark:
            freed = self.evict(int(capacity * cfg.low_watermark))
            if freed:
                log.info("evicted %d clean bytes (above the high watermark)", freed)
        if cfg.cache_ttl is not None:
            cutoff = time.monotonic() - cfg.cache_ttl
            with tree.lock:
                for entry in list(tree.entries.values()):
                    if entry.state == CLEAN and entry.local and entry.opens == 0 \
                            and entry.last_access < cutoff \
                            and entry.ino not in self._queue.pending:
                        self._data.drop_local(entry, "ttl")
        if cfg.keep_last_checkpoints is not None:
            self._retain_in_cache(cfg.keep_last_checkpoints)
        if self._store_keep_last is not None:
            self._retain_in_store(self._store_keep_last)

    # ------------------------------------------------------------------ retention

    def _checkpoint_groups(self) -> list[list[Entry]]:
        """Checkpoint directories (name matches checkpointPattern) grouped by parent, oldest
        first."""
        tree = self._tree
        groups: dict[int, list[Entry]] = {}
        with tree.lock:
            for ino in tree.checkpoint_dirs:
                entry = tree.entries[ino]
                groups.setdefault(entry.parent, []).append(entry)
        return [sorted(group, key=_natural) for group in groups.values()]

    def _subtree_settled(self, directory: Entry) -> bool:
        """Every file below is in the store under its final key and nothing is open."""
        pending = self._queue.pending
        return all(e.ino not in pending and not e.in_flight and e.opens == 0
                   for e in self._tree.walk(directory))

    def _retain_in_cache(self, keep: int) -> None:
        tree = self._tree
        for group in self._checkpoint_groups():
            for directory in group[:-keep] if len(group) > keep else []:
                with tree.lock:
                    if directory.ino not in tree.entries or not self._subtree_settled(directory):
                        continue
                    dropped = [self._data.drop_local(e, "retention") for e in tree.walk(directory)
                               if e.state == CLEAN and e.local]
                if dropped:
                    log.info("retention: dropped the cached copy of %s (%d bytes)",
                             tree.path_of(directory), sum(dropped))
                    tree.on_event("retention:cache", 1)

    def _retain_in_store(self, keep: int) -> None:
        tree = self._tree
        for group in self._checkpoint_groups():
            for directory in group[:-keep] if len(group) > keep else []:
                self._readthrough.ensure_subtree_listed(directory)
                with tree.lock, tree.journal.transaction():
                    if directory.ino not in tree.entries or not self._subtree_settled(directory):
                        continue
                    path = tree.path_of(directory)
                    self._namespace.remove_tree(directory)
                log.info("retention: deleting %s from the object store (store.keepLastCheckpoints"
                         "=%d)", path, keep)
                tree.on_event("retention:store", 1)

    # ------------------------------------------------------------------ progress

    def checkpoints(self, limit: int = 10) -> list[dict[str, Any]]:
        """Recent checkpoint directories and how far each has got.

        Candidates come from the tree's indexes (checkpoint directories, directories that hold
        a commit marker): only the ``limit`` newest are walked, never the whole namespace.
        """
        tree = self._tree
        is_marker = self._flush.is_commit_marker
        pending = self._queue.pending
        out: list[dict[str, Any]] = []
        with tree.lock:
            inos = set(tree.checkpoint_dirs)
            inos.update(tree.marker_parents)
            dirs = sorted((tree.entries[i] for i in inos if i in tree.entries),
                          key=lambda d: d.mtime_ns)
            for directory in dirs[-limit:]:
                files = list(tree.walk(directory))
                markers = [f for f in files if is_marker(f.name)]
                waiting = [f for f in files if f.ino in pending or f.in_flight]
                if not markers:
                    state = "writing"
                elif waiting:
                    state = "committed-locally"
                else:
                    state = "durable"
                written = sum(_size_now(f) for f in files)
                uploaded = sum(_uploaded(f, pending) for f in files)
                durable_at = [f.durable_at for f in files if f.durable_at is not None]
                out.append({"path": tree.path_of(directory) or "/", "state": state,
                            "files": len(files), "bytes": sum(f.size for f in files),
                            "pending_files": len(waiting),
                            "bytes_written": written, "bytes_uploaded": uploaded,
                            # wall time the last byte became durable (this process's uploads)
                            "durable_at": max(durable_at) if state == "durable"
                            and durable_at else None})
        return out


def _size_now(entry: Entry) -> int:
    """Bytes written so far: an open file's data file may be ahead of ``entry.size``."""
    if entry.fd >= 0 and entry.state == DIRTY:
        try:
            return os.fstat(entry.fd).st_size
        except OSError:
            return entry.size
    return entry.size


def _uploaded(entry: Entry, pending: set[int]) -> int:
    """Bytes of this file the store holds in its current form (streamed parts included)."""
    if entry.state != DIRTY and entry.ino not in pending:
        return entry.size
    if entry.in_flight:
        return entry.streamed
    return 0

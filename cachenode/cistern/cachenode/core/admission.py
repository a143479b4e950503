"""Admission and capacity: backpressure on writers, drain holds, the cache's size.

Dirty data is never dropped to make room: above the high watermark writers are slowed, at
capacity they wait for the flusher, and only a new file is refused (ENOSPC) when nothing is
freed within ``admissionTimeout``.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from pathlib import Path

from cistern.cachenode.core.model import err
from cistern.cachenode.core.tree import Tree
from cistern.cachenode.core.workqueue import WorkQueue
from cistern.config import CacheConfig, DrainPolicy

__all__ = ["Admission"]

log = logging.getLogger(__name__)


class Admission:
    def __init__(self, cache_dir: Path, tree: Tree, queue: WorkQueue, config: CacheConfig,
                 drain: DrainPolicy) -> None:
        self._tree = tree
        self._queue = queue
        self._config = config
        self._drain = drain
        self.capacity_bytes = self._capacity(cache_dir)
        self.draining = False
        self.writing: set[int] = set()
        """Files open for writing: what they wrote since their last sync counts as dirty."""

    def _capacity(self, cache_dir: Path) -> int:
        st = os.statvfs(cache_dir)
        size = st.f_blocks * st.f_frsize
        if self._config.capacity_bytes is not None:
            if self._config.capacity_bytes > size:
                # Backpressure would never engage before the disk is full: writers would get
                # ENOSPC from the file system instead of being slowed.
                raise err(errno.EINVAL, f"cache.capacityBytes {self._config.capacity_bytes} "
                          f"is larger than the file system of {cache_dir} ({size} bytes)")
            return self._config.capacity_bytes
        return int(size * self._config.capacity_percent / 100)

    def soft_limit(self) -> float:
        """Dirty bytes above which new writers are slowed (the high watermark)."""
        return self.capacity_bytes * self._config.high_watermark

    def live_dirty_bytes(self) -> int:
        """Dirty bytes including what open writers added since their last sync."""
        tree = self._tree
        with tree.lock:
            grown = 0
            for ino in self.writing:
                entry = tree.entries.get(ino)
                if entry is not None and entry.fd >= 0:
                    grown += max(0, os.fstat(entry.fd).st_size - entry.size)
            return tree.dirty_bytes + grown

    def admits_now(self) -> bool:
        """A new writer would be admitted at once (no drain hold, below the high watermark)."""
        return not self.draining and self.live_dirty_bytes() < self.soft_limit()

    def set_draining(self, on: bool) -> None:
        with self._tree.lock:
            self.draining = on
            self._tree.changed.notify_all()

    def _wait_for_drain_end(self) -> None:
        """``drain.newWrites: hold``: new writers wait while the node drains."""
        if self.draining and self._drain.new_writes == "hold":
            log.info("draining: holding a writer until the node resumes")
        while self.draining and self._drain.new_writes == "hold":
            self._tree.changed.wait(1.0)

    def admit(self, *, new_file: bool) -> None:
        """Backpressure: slow writers above the high watermark of dirty data, block them at
        capacity until the flusher frees space, and refuse new files (ENOSPC) when nothing
        frees up within ``admissionTimeout``. Existing files are never failed mid-write here.
        """
        tree = self._tree
        if self.draining:
            if self._drain.new_writes == "reject":
                raise err(errno.EROFS, "the cache is draining")
            with tree.lock:
                self._wait_for_drain_end()
        cap = self.capacity_bytes
        soft = self.soft_limit()
        dirty = self.live_dirty_bytes()
        if dirty < soft:
            return
        started = time.monotonic()
        deadline = started + self._config.admission_timeout
        if dirty < cap:
            # Slow down in proportion to how far into the band between soft and hard we are.
            time.sleep(min(0.2, 0.2 * (dirty - soft) / max(1.0, cap - soft)))
        else:
            log.warning("cache full: %d dirty bytes of %d; holding a writer until the flusher "
                        "frees space", dirty, cap)
            with tree.lock:
                self._queue.request_flush()
                while self.live_dirty_bytes() >= cap:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        tree.on_event("backpressure_seconds", time.monotonic() - started)
                        if new_file:
                            tree.on_event("admission_refused", 1)
                            log.error("refusing a new file: the cache holds %d dirty bytes "
                                      "(capacity %d) and nothing was freed in %.0fs",
                                      tree.dirty_bytes, cap, self._config.admission_timeout)
                            raise err(errno.ENOSPC, "the write cache is full of data not yet "
                                      "in the object store")
                        return
                    tree.changed.wait(min(left, 0.5))
        tree.on_event("backpressure_seconds", time.monotonic() - started)

"""Where the node's cache mounts are, and whether they are healthy.

Convention (shared with the node daemon, the operator and the chart): the daemon of WriteCache
``NAMESPACE/NAME`` mounts its FUSE file system at ``<mount-root>/<cache-key>``
(``cistern.writecache.cache_key``: ``NAMESPACE.NAME``, bounded). A cache is

* **absent** when ``<mount-root>/NAME`` does not exist: no daemon of that WriteCache has ever run
  on this node (NOT_FOUND);
* **down** when the directory exists but nothing is mounted there (UNAVAILABLE: the daemon is not
  running, or has not mounted yet);
* **foreign** when something other than a ``fuse.cistern`` file system is mounted there
  (FAILED_PRECONDITION);
* **broken** when the ``fuse.cistern`` mount is in the mount table but does not answer
  ``statfs`` within the health timeout (the daemon died: ENOTCONN, or hangs) (UNAVAILABLE);
* **healthy** otherwise: the daemon answered through the kernel.

The state is always read from ``/proc/self/mountinfo`` and one ``statfs``, never remembered.
``statfs`` rather than ``stat``: the kernel answers ``stat`` of the mount root from its attribute
cache for a while after the daemon died, but always asks the daemon for ``statfs``.
"""

from __future__ import annotations

import concurrent.futures
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from cistern.csi.errors import FailedPrecondition, NotFound, Unavailable
from cistern.csi.mounts import MountEntry, MountTable, read_mount_table

__all__ = ["CACHE_FSTYPE", "CacheMounts", "HealthyCache", "call_with_timeout"]

CACHE_FSTYPE = "fuse.cistern"
_CACHE_KEY = re.compile(r"[a-z0-9]([-a-z0-9._]*[a-z0-9])?")

T = TypeVar("T")


def call_with_timeout(fn: Callable[[], T], timeout: float, what: str) -> T:
    """Run a call that may block on a hung FUSE daemon; raise TimeoutError after ``timeout``.

    The worker thread of a call that never returns is abandoned (daemon thread), which is the
    best user space can do against a hung file system.
    """
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="fs-probe")
    try:
        future = pool.submit(fn)
        try:
            return future.result(timeout=timeout)
        except concurrent.futures.TimeoutError:
            raise TimeoutError(f"{what} did not answer within {timeout:g}s") from None
    finally:
        pool.shutdown(wait=False)


class HealthyCache:
    """A cache mount that answered just now."""

    def __init__(self, name: str, path: Path, entry: MountEntry) -> None:
        self.name = name
        self.path = path
        self.entry = entry


class CacheMounts:
    """The cache mounts under one mount root."""

    def __init__(self, root: str | Path, health_timeout: float = 5.0) -> None:
        self.root = Path(os.path.normpath(str(root)))
        self.health_timeout = health_timeout

    def path_of(self, name: str) -> Path:
        return self.root / name

    def names(self) -> list[str]:
        """WriteCaches with a mount directory on this node (healthy or not)."""
        try:
            entries = list(os.scandir(self.root))
        except FileNotFoundError:
            return []
        return sorted(e.name for e in entries
                      if len(e.name) <= 63 and _CACHE_KEY.fullmatch(e.name)
                      and e.is_dir(follow_symlinks=False))

    def require(self, name: str, table: MountTable | None = None) -> HealthyCache:
        """The healthy mount of WriteCache ``name``, or the CSI error that says why not."""
        path = self.path_of(name)
        table = table or read_mount_table()
        entry = table.at(path)
        if entry is None:
            if not os.path.isdir(path):
                raise NotFound(f"WriteCache {name!r} has no cache on this node "
                               f"(no {path}); is its daemon scheduled here?")
            raise Unavailable(f"the cache daemon of WriteCache {name!r} is not running on this "
                              f"node: nothing is mounted at {path}")
        if entry.fstype != CACHE_FSTYPE:
            raise FailedPrecondition(f"{path} is a {entry.fstype} mount, not a Cistern cache "
                                     f"({CACHE_FSTYPE}); refusing to use it")
        try:
            call_with_timeout(lambda: os.statvfs(path), self.health_timeout, f"cache mount {path}")
        except (OSError, TimeoutError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise Unavailable(f"the cache mount {path} of WriteCache {name!r} is broken "
                              f"({reason}): its daemon died or hangs") from exc
        return HealthyCache(name, path, entry)

"""The cache core: namespace, file state machine and local data, with no FUSE and no network.

Front ends (pyfuse3, kernel passthrough) translate kernel requests into calls on ``CacheCore``;
the flusher asks it for work (``collect_work``) and reports results (``finish_*``); the object
store is only touched through the store passed in, for listing and fetching.

State of a file (journaled): DIRTY (local newer than the store), CLEAN (the store has it, a
local copy is cached), REMOTE (only in the store). "Uploading" is DIRTY plus ``in_flight``.

``CacheCore`` (facade.py) is a thin facade over the parts, which share one ``Tree`` and its
lock (docs/dev/cachenode.md maps each invariant to the module that keeps it):

  model        values handed out: Attr, Handle, UploadWork / MoveWork / DeleteWork, errors
  tree         entries, names, the lock, byte totals, indexes kept as names change
  keys         key ownership: owners and tombstones
  datafiles    local data files, spare files, dropping or losing a local copy
  workqueue    pending work, ordering (commit markers last), the flusher's results
  admission    capacity, backpressure, drain holds
  readthrough  listing the store into the namespace, fetching on open
  openfiles    open / read / write / fsync / release / setattr / truncate
  namespace    lookup, readdir, mkdir, create, unlink, rmdir, rename
  streams      streaming uploads of large files while they are written
  retention    eviction, TTL, keep-last-N checkpoints, checkpoint progress
  recovery     rebuilding all of the above from the journal after a stop or a crash
"""

from cistern.cachenode.core.facade import CacheCore
from cistern.cachenode.core.model import (
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    ROOT_INO,
    Attr,
    DeleteWork,
    Handle,
    MoveWork,
    StreamWork,
    UploadWork,
    Work,
)
from cistern.cachenode.core.streams import StreamState

__all__ = [
    "RENAME_EXCHANGE",
    "RENAME_NOREPLACE",
    "ROOT_INO",
    "Attr",
    "CacheCore",
    "DeleteWork",
    "Handle",
    "MoveWork",
    "StreamState",
    "StreamWork",
    "UploadWork",
    "Work",
]

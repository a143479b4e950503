"""Copies whose origin died reach the store: uploaded by one holder, decided by S3.

Every ``CHECK_EVERY`` seconds the rescuer pings the origin of each copy it holds. An origin that
has not answered for ``peers.deadAfter`` (or left the member list for as long) is dead: each of
its copies is *settled*, commit markers last (so an S3 reader never sees a complete checkpoint
with shards missing). Settling a copy:

1. HEAD the key. An object with the copy's MD5 (``cistern-md5``) or, for objects without it,
   its size and ``mtime-ns`` is this version: the copy is dropped.
2. Otherwise PUT it conditionally: ``If-Match: <etag>`` when the origin knew an object there,
   else ``If-None-Match: *``. Of all holders racing, the store lets exactly one create it; the
   others get 412, see step 1's match on a HEAD and drop their copy. No duplicate object, no
   lock or consensus of our own.
3. A 412 with a *different* object at the key (another writer) keeps the copy and counts it as
   a conflict (``copies_conflicting``); it is not uploaded over the other version.

A copy above ``single_put_limit`` (S3's 5 GiB cap on one PUT) goes up as a multipart upload
(parts of ``part_size``, at most 10,000) completed with the same condition; as the flusher
does, an overwrite HEADs the key just before Complete (``check_etag``: a store may ignore
``If-Match`` on Complete, moto does), and a failed upload is aborted. A multipart object has no
``cistern-md5``: step 1 matches it by size and ``mtime-ns``.

Copies of live origins are checked the same way (step 1 only) once they are older than
``deadAfter``: the writer's DROP after its upload can be lost with a connection.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Protocol

from cistern.cachenode.peers.client import PeerPool
from cistern.cachenode.peers.copies import CopyRow, CopyStore
from cistern.cachenode.peers.index import PeerIndex
from cistern.cachenode.peers.membership import Membership
from cistern.cachenode.peers.protocol import Op, PeerError
from cistern.cachenode.store import (
    CHECKSUM_KEY,
    MAX_SINGLE_PUT,
    ObjectInfo,
    PreconditionFailed,
    StoreError,
    part_size_for,
)

__all__ = ["Rescuer"]

log = logging.getLogger(__name__)

CHECK_EVERY = 1.0
PART_SIZE = 256 * 2**20


class RescueStore(Protocol):
    def head(self, key: str) -> ObjectInfo: ...

    def put_file(self, key: str, fd: int, size: int, metadata: dict[str, str],
                 if_match: str | None = None, if_none_match: bool = False) -> str: ...

    def create_multipart(self, key: str, metadata: dict[str, str]) -> str: ...

    def upload_part(self, key: str, upload_id: str, number: int, fd: int, offset: int,
                    length: int) -> str: ...

    def complete_multipart(self, key: str, upload_id: str, parts: list[tuple[int, str]],
                           if_match: str | None = None, if_none_match: bool = False) -> str: ...

    def abort_multipart(self, key: str, upload_id: str) -> None: ...

    def check_etag(self, key: str, etag: str) -> None: ...


def same_version(info: ObjectInfo, row: CopyRow) -> bool:
    md5 = info.metadata.get(CHECKSUM_KEY)
    if md5 is not None:
        return md5 == row.md5
    return info.size == row.size and info.metadata.get("mtime-ns") == str(row.mtime_ns)


class Rescuer:
    def __init__(self, copies: CopyStore, pool: PeerPool, membership: Membership,
                 store: RescueStore, dead_after: float,
                 is_marker: Callable[[str], bool], index: PeerIndex,
                 single_put_limit: int = MAX_SINGLE_PUT, part_size: int = PART_SIZE) -> None:
        self.single_put_limit = single_put_limit
        self.part_size = part_size
        self.copies = copies
        self.index = index
        self.pool = pool
        self.membership = membership
        self.store = store
        self.dead_after = dead_after
        self.is_marker = is_marker
        self._last_seen: dict[str, float] = {}
        self._next_check: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()
        self.uploaded_total = 0
        self.lost_races_total = 0
        self.conflicting: set[tuple[str, str]] = set()
        self.dead: set[str] = set()

    def check(self) -> None:
        """One round: liveness of every origin, then settle what needs settling."""
        now = time.monotonic()
        rows = self.copies.rows()
        for origin in sorted({r.origin for r in rows}):
            if self._answers(origin):
                self._last_seen[origin] = now
                self.dead.discard(origin)
                for row in rows:  # one HEAD per copy per deadAfter, not per round
                    due = self._next_check.get((origin, row.key), row.received + self.dead_after)
                    if row.origin == origin and time.time() >= due:
                        self._next_check[(origin, row.key)] = time.time() + self.dead_after
                        self.settle(row, upload=False)
                continue
            seen = self._last_seen.setdefault(origin, now)
            if now - seen < self.dead_after:
                continue
            if origin not in self.dead:
                log.error("peer %s has not answered for %.0fs: uploading the copies it left "
                          "here", origin, now - seen)
                self.dead.add(origin)
            mine = [r for r in rows if r.origin == origin]
            # Commit markers last, as the origin's flusher would have: after this holder's
            # other copies, and only once every file of the marker's directory the origin
            # announced (other holders' copies too) is in the store.
            for row in sorted(mine, key=lambda r: (self._is_marker(r), r.key)):
                if self._is_marker(row) and not self._siblings_stored(row):
                    continue
                self.settle(row, upload=True)

    def _is_marker(self, row: CopyRow) -> bool:
        return self.is_marker(row.key.rsplit("/", 1)[-1])

    def _siblings_stored(self, marker: CopyRow) -> bool:
        directory = marker.key.rsplit("/", 1)[0] + "/" if "/" in marker.key else ""
        for entry in self.index.under_all(directory):
            if entry.origin != marker.origin or entry.key == marker.key \
                    or self.is_marker(entry.key.rsplit("/", 1)[-1]):
                continue
            try:
                if self.store.head(entry.key).size == entry.size:
                    continue
            except FileNotFoundError:
                pass
            except StoreError:
                return False
            log.info("%s: commit marker for %s waits for %s", marker.key, marker.origin,
                     entry.key)
            return False
        return True

    def _answers(self, origin: str) -> bool:
        member = self.membership.get(origin)
        if member is None:
            return False
        try:
            self.pool.call(member, Op.PING, {}, time.monotonic() + min(2.0, self.dead_after))
            return True
        except PeerError:
            return False

    def settle(self, row: CopyRow, upload: bool) -> None:
        try:
            if self._in_store(row):
                self._drop(row, "in the store")
                return
            if not upload or (row.origin, row.key) in self.conflicting:
                return
            fd = os.open(self.copies.data_path(row), os.O_RDONLY)
            try:
                self._upload(row, fd)
            finally:
                os.close(fd)
        except PreconditionFailed:
            if self._in_store(row):
                self.lost_races_total += 1
                self._drop(row, "another holder uploaded it")
            else:
                self.conflicting.add((row.origin, row.key))
                log.error("%s (copy for %s): another version is in the store; the copy is "
                          "kept, not uploaded over it", row.key, row.origin)
            return
        except (StoreError, OSError) as exc:
            log.warning("%s (copy for %s): %s; retried next round", row.key, row.origin, exc)
            return
        self.uploaded_total += 1
        log.info("%s: uploaded the copy held for %s", row.key, row.origin)
        self._drop(row, "uploaded")

    def _upload(self, row: CopyRow, fd: int) -> None:
        metadata = {"mode": oct(row.mode & 0o7777), "mtime-ns": str(row.mtime_ns)}
        if row.size <= self.single_put_limit:
            self.store.put_file(row.key, fd, row.size, metadata, if_match=row.etag,
                                if_none_match=row.etag is None)
            return
        part = part_size_for(row.size, self.part_size)
        upload_id = self.store.create_multipart(row.key, metadata)
        try:
            receipts = [(number, self.store.upload_part(row.key, upload_id, number, fd, offset,
                                                        min(part, row.size - offset)))
                        for number, offset in enumerate(range(0, row.size, part), 1)]
            if row.etag is not None:
                self.store.check_etag(row.key, row.etag)
            self.store.complete_multipart(row.key, upload_id, receipts, if_match=row.etag,
                                          if_none_match=row.etag is None)
        except BaseException:
            with contextlib.suppress(StoreError, OSError):
                self.store.abort_multipart(row.key, upload_id)
            raise

    def _in_store(self, row: CopyRow) -> bool:
        try:
            return same_version(self.store.head(row.key), row)
        except FileNotFoundError:
            return False

    def _drop(self, row: CopyRow, why: str) -> None:
        self._next_check.pop((row.origin, row.key), None)
        if self.copies.drop(row.origin, row.key, upto_gen=row.gen):
            log.info("%s: copy for %s dropped (%s)", row.key, row.origin, why)

"""Peer reads: files other nodes hold dirty, seen through the object-store interface.

``PeerOverlayStore`` wraps the node's ``ObjectStore``: a listing shows the index's files
(``index.PeerIndex``) next to the objects, a HEAD or a download of such a key is served from
the origin node or a holder of a copy (READ, in chunks), and anything the peers cannot serve
falls through to the store. Writes go to the store unchanged. So the cache core needs no
change to read a file another node has not uploaded yet: it is a REMOTE entry whose fetch
happens to come from a peer.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator

from cistern.cachenode.peers.client import PeerPool
from cistern.cachenode.peers.index import IndexEntry, PeerIndex
from cistern.cachenode.peers.membership import Member, Membership
from cistern.cachenode.peers.protocol import Op, PeerError
from cistern.cachenode.peers.regions import RegionReads
from cistern.cachenode.store import ObjectInfo, ObjectStore

__all__ = ["PeerOverlayStore", "PeerReader"]

log = logging.getLogger(__name__)

READ_CHUNK = 4 * 2**20
WINDOW = 4


class PeerReader:
    """Reads a peer-held file into a local descriptor, origin first, then the holders."""

    def __init__(self, pool: PeerPool, membership: Membership, timeout: float,
                 local: Callable[[str, int, int], bytes | None],
                 one_sided: RegionReads | None = None) -> None:
        self.pool = pool
        self.one_sided = one_sided
        """One-sided reads (RDMA) tried first when the node has them, TCP READs after."""
        self.local = local
        self.membership = membership
        self.timeout = timeout
        self.bytes_read_total = 0

    def fetch(self, entry: IndexEntry, fd: int) -> bool:
        if self._fetch_local(entry, fd):
            return True
        # The origin first; then holders (named, or found by asking: a member without the
        # file answers "missing" at once).
        others = [m.node for m in self.membership.others()]
        for node in dict.fromkeys((entry.origin, *entry.holders, *others)):
            member = self.membership.get(node)
            if member is None or not self.pool.usable(member):
                continue
            done = self._fetch_one_sided(member, entry, fd)
            if done is not None:
                if done:
                    return True
                continue
            try:
                self._fetch_from(member, entry, fd)
                return True
            except PeerError as exc:
                log.info("%s: peer read from %s failed: %s", entry.key, node, exc)
        return False

    def _fetch_one_sided(self, member: Member, entry: IndexEntry, fd: int) -> bool | None:
        """True: read; False: this member cannot serve it at all; None: read it over TCP."""
        reads = self.one_sided
        if reads is None or not reads.usable(member):
            return None
        try:
            reads.fetch(member, entry.key, entry.size, fd)
        except PeerError as exc:
            if exc.code in ("missing", "timeout", "unreachable"):
                log.info("%s: one-sided read from %s: %s", entry.key, member.node, exc)
                return False
            if exc.code != "busy":
                reads.fell_back(member, exc)
            return None
        except Exception as exc:  # an engine failure is a reason to use TCP, never a crash
            reads.fell_back(member, exc)
            return None
        self.bytes_read_total += entry.size
        return True

    def _fetch_local(self, entry: IndexEntry, fd: int) -> bool:
        """From a copy this node holds itself."""
        offset = 0
        while offset < entry.size:
            data = self.local(entry.key, offset, min(READ_CHUNK, entry.size - offset))
            if not data:
                return False
            os.pwrite(fd, data, offset)
            offset += len(data)
        return True

    def _fetch_from(self, member: Member, entry: IndexEntry, fd: int) -> None:
        """READs pipelined on one connection (WINDOW in flight), each answer within the
        timeout (a silent peer fails after it; a live one finishes whatever the size)."""
        os.ftruncate(fd, 0)
        with self.pool.connection(member, time.monotonic() + self.timeout) as conn:
            conn.sock.settimeout(self.timeout)
            asked = 0
            pending: list[tuple[int, int]] = []
            offset = 0
            while offset < entry.size:
                while asked < entry.size and len(pending) < WINDOW:
                    length = min(READ_CHUNK, entry.size - asked)
                    pending.append((conn.send(Op.READ, {"key": entry.key, "offset": asked,
                                                        "length": length}), asked))
                    asked += length
                request_id, at = pending.pop(0)
                frame = conn.receive(request_id, Op.DATA)
                if not frame.payload:
                    raise PeerError(f"{entry.key}: peer has {at} of {entry.size} bytes", "short")
                os.pwrite(fd, frame.payload, at)
                offset = at + len(frame.payload)
                if offset < at + min(READ_CHUNK, entry.size - at):
                    raise PeerError(f"{entry.key}: short read from the peer", "short")
        self.bytes_read_total += entry.size


def _info(entry: IndexEntry) -> ObjectInfo:
    return ObjectInfo(key=entry.key, size=entry.size, mtime=entry.mtime_ns / 1e9,
                      etag=f"peer-{entry.origin}-{entry.version}",
                      metadata={"mtime-ns": str(entry.mtime_ns)})


class PeerOverlayStore:
    def __init__(self, inner: ObjectStore, index: PeerIndex, reader: PeerReader) -> None:
        self.inner = inner
        self.index = index
        self.reader = reader
        self.description = inner.description

    # reads: the peers' dirty files over the store's objects

    def list_dir(self, prefix: str) -> tuple[list[ObjectInfo], list[str]]:
        objects, dirs = self.inner.list_dir(prefix)
        files, peer_dirs = self.index.under(prefix)
        known = {o.key for o in objects}
        objects = objects + [_info(e) for e in files if e.key not in known]
        return objects, sorted(set(dirs) | peer_dirs)

    def head(self, key: str) -> ObjectInfo:
        # The store only: a HEAD asks whether the *store* has the object (revalidation, the
        # rescue's check before uploading); a peer-held file is not in it.
        return self.inner.head(key)

    def download(self, key: str, fd: int) -> ObjectInfo:
        entry = self.index.lookup(key)
        if entry is not None and self.reader.fetch(entry, fd):
            return _info(entry)
        if entry is not None:
            os.ftruncate(fd, 0)
        return self.inner.download(key, fd)

    def list_all(self, prefix: str) -> Iterator[ObjectInfo]:
        return self.inner.list_all(prefix)

    # everything else: the store itself

    def check(self) -> None:
        self.inner.check()

    def put_file(self, key: str, fd: int, size: int, metadata: dict[str, str],
                 if_match: str | None = None, if_none_match: bool = False) -> str:
        return self.inner.put_file(key, fd, size, metadata, if_match=if_match,
                                   if_none_match=if_none_match)

    def create_multipart(self, key: str, metadata: dict[str, str]) -> str:
        return self.inner.create_multipart(key, metadata)

    def upload_part(self, key: str, upload_id: str, number: int, fd: int, offset: int,
                    length: int) -> str:
        return self.inner.upload_part(key, upload_id, number, fd, offset, length)

    def complete_multipart(self, key: str, upload_id: str, parts: list[tuple[int, str]]) -> str:
        return self.inner.complete_multipart(key, upload_id, parts)

    def abort_multipart(self, key: str, upload_id: str) -> None:
        self.inner.abort_multipart(key, upload_id)

    def list_multipart(self, key: str) -> list[str]:
        return self.inner.list_multipart(key)

    def copy(self, src: str, dst: str, metadata: dict[str, str] | None = None) -> None:
        self.inner.copy(src, dst, metadata)

    def delete(self, key: str) -> None:
        self.inner.delete(key)

"""The core's replication hook over the peer network (durability level ``peers``).

``replicate`` (called by the core's ``fsync`` after the local fsync and journal sync): the
whole file goes to the first ``N`` usable members in rendezvous order of its key (a stable
choice per path, spread over the members); a member that fails is replaced by the next one,
all within one deadline (``durability.peerTimeout``). Every other member is told the file
exists (ANNOUNCE: the peer-read index) in the same round. Fewer than ``N`` acknowledgements at
the deadline: ``onShortfall`` (``degrade``: counted and reported; ``fail``: EIO).

Afterwards the writer keeps ``replicated`` (key -> version, holders): ``sweep`` tells the
holders to drop a copy once the file is no longer DIRTY here (uploaded), renames and unlinks
follow at once.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

from cistern.cachenode.core.replication import FileVersion, Level
from cistern.cachenode.peers.client import LocalFileError, PeerPool
from cistern.cachenode.peers.index import moved_key
from cistern.cachenode.peers.membership import Member, Membership
from cistern.cachenode.peers.protocol import Op, PeerError
from cistern.peerconfig import DurabilityPolicy

__all__ = ["PeerReplication", "ReplicationStats"]

log = logging.getLogger(__name__)


@dataclass
class ReplicationStats:
    replicated_total: int = 0
    replicated_bytes_total: int = 0
    shortfalls_total: int = 0
    failed_fsyncs_total: int = 0
    last_shortfall: str | None = None
    fsync_seconds: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class _Replicated:
    version: int
    holders: tuple[str, ...]
    size: int
    mtime_ns: int


def rendezvous(key: str, members: list[Member]) -> list[Member]:
    return sorted(members, key=lambda m: hashlib.sha256(f"{m.node}|{key}".encode()).digest())


class PeerReplication:
    def __init__(self, policy: DurabilityPolicy, pool: PeerPool, membership: Membership,
                 holds_dirty: Callable[[str], bool] | None = None) -> None:
        self.policy = policy
        self.pool = pool
        self.membership = membership
        self.holds_dirty = holds_dirty or (lambda key: True)
        self.stats = ReplicationStats()
        self._lock = threading.Lock()
        self.replicated: dict[str, _Replicated] = {}
        self._executor = ThreadPoolExecutor(max_workers=32, thread_name_prefix="peer-send")

    # ------------------------------------------------------------------ the core's hook

    def level(self, key: str) -> Level:
        return self.policy.for_key(key)[0]

    def replicate(self, version: FileVersion, if_changed: bool = False) -> None:
        try:
            if if_changed:
                with self._lock:
                    last = self.replicated.get(version.key)
                if last is not None and (last.size, last.mtime_ns) == (version.size,
                                                                       version.mtime_ns):
                    return
            self._replicate(version)
        finally:
            os.close(version.fd)

    def _replicate(self, version: FileVersion) -> None:
        _, wanted = self.policy.for_key(version.key)
        bound = self.policy.peer_timeout
        stamp = time.time_ns()
        started = time.monotonic()
        members = [m for m in rendezvous(version.key, self.membership.others())
                   if self.pool.usable(m)]
        # Every member learns of the file (the peer-read index), in parallel with the copies.
        announcing = [self._executor.submit(self.pool.call, m, Op.ANNOUNCE, {
            "key": version.key, "size": version.size, "mtime_ns": version.mtime_ns,
            "version": stamp, "holders": []}, started + bound) for m in members]
        header = {"key": version.key, "size": version.size, "mtime_ns": version.mtime_ns,
                  "mode": version.mode, "gen": stamp, "etag": version.etag}
        candidates = list(members)
        sending: dict[Future[Any], Member] = {}
        progress: dict[str, float] = {}
        hedged: set[str] = set()
        holders: list[str] = []

        def launch(member: Member) -> None:
            progress[member.node] = time.monotonic()
            # Its own descriptor: a hedged straggler may still read after this fsync returned
            # and closed version.fd (whose number may then name another file).
            fd = os.dup(version.fd)

            def moved() -> None:
                progress[member.node] = time.monotonic()

            def send() -> str:
                try:
                    return self.pool.send_copy(member, header, fd, version.size, bound, moved)
                finally:
                    os.close(fd)
            sending[self._executor.submit(send)] = member

        while len(holders) < wanted and (candidates or sending):
            while candidates and len(sending) + len(holders) < wanted + len(hedged):
                launch(candidates.pop(0))
            if not sending:
                break
            done, _ = wait(list(sending), timeout=bound / 4, return_when=FIRST_COMPLETED)
            for future in done:
                member = sending.pop(future)
                try:
                    future.result()
                    holders.append(member.node)
                except (PeerError, LocalFileError) as exc:
                    log.warning("%s: copy to %s failed: %s", version.key, member.node, exc)
            # A member silent for half the bound is hedged: the next candidate starts too, so
            # a stopped peer costs at most the bound (its send fails by then); a slow but
            # live one is not hedged, whatever the file's size. Extra copies are harmless.
            now = time.monotonic()
            for member in sending.values():
                if now - progress[member.node] > bound / 2:
                    hedged.add(member.node)
        wait(announcing, timeout=max(0.0, started + bound - time.monotonic()))
        with self._lock:
            self.stats.replicated_total += len(holders)
            self.stats.replicated_bytes_total += len(holders) * version.size
            if holders:
                self.replicated[version.key] = _Replicated(stamp, tuple(holders),
                                                           version.size, version.mtime_ns)
        if len(holders) >= wanted:
            return
        message = (f"{version.key}: {len(holders)} of {wanted} peer copies ({len(members)} "
                   f"members usable; a silent one is given up after {bound:g}s)")
        with self._lock:
            self.stats.shortfalls_total += 1
            self.stats.last_shortfall = message
        if self.policy.on_shortfall == "fail":
            self.stats.failed_fsyncs_total += 1
            log.error("%s: fsync fails (durability.onShortfall: fail)", message)
            raise OSError(errno.EIO, f"{os.strerror(errno.EIO)}: {message}")
        log.warning("%s: durable on this node only (durability.onShortfall: degrade)", message)

    def renamed(self, old: str, new: str) -> None:
        with self._lock:
            moved = {k: (target, v) for k, v in self.replicated.items()
                     if (target := moved_key(k, old, new)) is not None}
            for key, (target, rec) in moved.items():
                del self.replicated[key]
                self.replicated[target] = rec
        if moved:
            self._broadcast(self._usable(), Op.RENAME, {"old": old, "new": new},
                            time.monotonic() + self.policy.peer_timeout)

    def removed(self, key: str) -> None:
        with self._lock:
            rec = self.replicated.pop(key, None)
        if rec is not None:
            self._broadcast(self._usable(), Op.DROP, {"key": key, "upto": rec.version},
                            time.monotonic() + self.policy.peer_timeout)

    # ------------------------------------------------------------------ after the upload

    def sweep(self) -> int:
        """Tell holders to drop copies of files that are no longer DIRTY here."""
        with self._lock:
            items = list(self.replicated.items())
        done = 0
        for key, rec in items:
            if self.holds_dirty(key):
                continue
            with self._lock:
                if self.replicated.get(key) != rec:
                    continue
                del self.replicated[key]
            self._broadcast(self._usable(), Op.DROP, {"key": key, "upto": rec.version},
                            time.monotonic() + self.policy.peer_timeout)
            done += 1
        return done

    # ------------------------------------------------------------------ helpers

    def _usable(self) -> list[Member]:
        return [m for m in self.membership.others() if self.pool.usable(m)]

    def _broadcast(self, members: list[Member], op: Op, header: dict[str, Any],
                   deadline: float) -> int:
        """Send one request to each member in parallel; answers by the deadline."""
        futures = [self._executor.submit(self.pool.call, m, op, header, deadline)
                   for m in members]
        left = max(0.0, deadline - time.monotonic())
        done, _ = wait(futures, timeout=left) if futures else (set(), set())
        return sum(1 for f in done if f.exception() is None)

    def held_copies(self) -> int:
        with self._lock:
            return len(self.replicated)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

"""One node's peer network: wiring, the server's handler, the background round, status.

Built by the daemon when ``peers.listen`` is set: the replication hook goes into the core, the
overlay wraps the object store, the server answers the other members, and one thread runs the
sweep (drop copies of files uploaded here) and the rescue round (copies of dead nodes) once a
second.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from cistern.cachenode.peers import auth
from cistern.cachenode.peers.client import PeerPool
from cistern.cachenode.peers.copies import CopyStore, check_node_name
from cistern.cachenode.peers.index import IndexEntry, PeerIndex
from cistern.cachenode.peers.membership import Membership
from cistern.cachenode.peers.overlay import PeerOverlayStore, PeerReader
from cistern.cachenode.peers.protocol import ProtocolError, field_of
from cistern.cachenode.peers.regions import Engine, RegionReads, RegionTable, TcpEngine
from cistern.cachenode.peers.replicator import PeerReplication
from cistern.cachenode.peers.rescue import Rescuer, RescueStore
from cistern.cachenode.peers.server import PeerServer
from cistern.cachenode.peers.transport import choose_transport, open_engine
from cistern.cachenode.store import ObjectStore
from cistern.config import NodeConfig, parse_hostport
from cistern.nodestatus import PeersStatus

__all__ = ["PeerNode", "PeerSetupError"]

log = logging.getLogger(__name__)

ROUND_EVERY = 1.0


class PeerSetupError(Exception):
    """The peer network cannot start (token, address); the message says why."""


class LocalFiles(Protocol):
    def read_local(self, key: str, offset: int, size: int) -> bytes | None: ...

    def holds_dirty(self, key: str) -> bool: ...


class PeerNode:
    def __init__(self, config: NodeConfig, cache_dir: Path) -> None:
        pc = config.peers
        assert pc.listen and pc.members_file and pc.token_file  # checked by NodeConfig
        try:
            self.node = check_node_name(pc.node_name or socket.gethostname())
            token = auth.load_token(pc.token_file)
            host, port = parse_hostport(pc.listen, "peers.listen")
        except (OSError, ValueError) as exc:
            raise PeerSetupError(f"peers: {getattr(exc, 'strerror', None) or exc}") from exc
        engine, self.transport = open_engine(choose_transport(pc.transport))
        log.info("peer transport: %s (%s)", self.transport.name, self.transport.reason)
        self.membership = Membership(Path(pc.members_file), self.node)
        self.pool = PeerPool(self.node, token, pc.suspect_for)
        self.copies = CopyStore(cache_dir / "peers" / "copies")
        self.index = PeerIndex()
        self.replication = PeerReplication(config.durability, self.pool, self.membership)
        engines: dict[str, Engine] = {"tcp": TcpEngine()}
        self.one_sided: RegionReads | None = None
        if engine is not None:
            engines[engine.name] = engine
            self.one_sided = RegionReads(engine, self.pool, config.durability.peer_timeout)
        self.regions = RegionTable(engines)
        self.reader = PeerReader(self.pool, self.membership, config.durability.peer_timeout,
                                 local=self.read_local, one_sided=self.one_sided)
        self.dead_after = pc.dead_after
        self._files: LocalFiles | None = None
        self.rescuer: Rescuer | None = None
        self._stopping = threading.Event()
        try:
            self.server = PeerServer(host, port, self.node, token, self.copies, self,
                                     self.regions)
        except OSError as exc:
            raise PeerSetupError(f"peers.listen {pc.listen}: {exc.strerror}") from exc

    def overlay(self, store: ObjectStore) -> PeerOverlayStore:
        return PeerOverlayStore(store, self.index, self.reader)

    def start(self, files: LocalFiles, store: RescueStore,
              is_marker: Callable[[str], bool]) -> None:
        self._files = files
        self.replication.holds_dirty = files.holds_dirty
        self.rescuer = Rescuer(self.copies, self.pool, self.membership, store,
                               self.dead_after, is_marker, self.index)
        self.server.start()
        threading.Thread(target=self._rounds, name="peer-rounds", daemon=True).start()
        log.info("peer server of %s on port %d", self.node, self.server.port)

    def stop(self) -> None:
        self._stopping.set()
        self.server.stop()
        self.replication.close()
        self.pool.close()

    def _rounds(self) -> None:
        while not self._stopping.wait(ROUND_EVERY):
            try:
                self.replication.sweep()
                if self.rescuer is not None:
                    self.rescuer.check()
            except Exception:  # a round must never take the daemon down
                log.exception("peer round failed")

    # ------------------------------------------------------------------ the server's handler

    def read_local(self, key: str, offset: int, length: int) -> bytes | None:
        if self._files is not None:
            data = self._files.read_local(key, offset, length)
            if data is not None:
                return data
        row = self.copies.find(key)
        if row is None:
            return None
        try:
            fd = os.open(self.copies.data_path(row), os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            return os.pread(fd, length, offset)
        finally:
            os.close(fd)

    def on_announce(self, origin: str, header: dict[str, Any]) -> None:
        key = header["key"]
        version = field_of(header, "version", int, limit=2**63)
        if header.get("gone"):
            self.index.gone(origin, key, version)
            return
        holders = header.get("holders")
        if not isinstance(holders, list) or not all(isinstance(h, str) for h in holders) \
                or len(holders) > 64:
            raise ProtocolError("field 'holders': expected a list of node names")
        self.index.put(IndexEntry(key=key, origin=origin,
                                  size=field_of(header, "size", int, limit=2**40),
                                  mtime_ns=field_of(header, "mtime_ns", int, limit=2**63),
                                  version=version, holders=tuple(holders)))

    def on_rename(self, origin: str, old: str, new: str) -> None:
        self.copies.rename(origin, old, new)
        self.index.rename(origin, old, new)

    def on_drop(self, origin: str, key: str, upto: int | None) -> None:
        self.copies.drop(origin, key, upto)
        self.index.gone(origin, key, upto)

    # ------------------------------------------------------------------ status

    def _transport_reason(self) -> str:
        fallback = self.one_sided.last_fallback if self.one_sided else ""
        return f"{self.transport.reason}; {fallback}" if fallback else self.transport.reason

    def status(self) -> PeersStatus:
        stats = self.replication.stats
        rescuer = self.rescuer
        return PeersStatus(
            node=self.node,
            port=self.server.port,
            transport=self.transport.name,
            transport_reason=self._transport_reason(),
            members=tuple(m.node for m in self.membership.others()),
            suspects=tuple(self.pool.suspects()),
            bytes_held_for_peers=self.copies.bytes_held(),
            copies_held_for_peers=len(self.copies.rows()),
            files_with_copies=self.replication.held_copies(),
            copies_sent_total=stats.replicated_total,
            copies_missing_total=stats.shortfalls_total,
            last_copies_missing=stats.last_shortfall,
            failed_fsyncs_total=stats.failed_fsyncs_total,
            peer_files_known=len(self.index),
            peer_read_bytes_total=self.reader.bytes_read_total,
            rescued_uploads_total=rescuer.uploaded_total if rescuer else 0,
            rescue_races_lost_total=rescuer.lost_races_total if rescuer else 0,
            copies_conflicting=len(rescuer.conflicting) if rescuer else 0,
            dead_peers=tuple(sorted(rescuer.dead)) if rescuer else (),
            refused_connections_total=self.server.refused_total,
        )

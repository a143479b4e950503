"""The members of a WriteCache: a JSON file the operator keeps current (a ConfigMap key).

``{"members": [{"node": "n1", "host": "10.0.0.5", "port": 7070}, ...]}``. The file is checked
at most once a second (stat: mtime, inode, size — a ConfigMap volume swaps a symlink) and
re-read when it changed, so nodes join and leave without a restart. A file that cannot be read
or parsed keeps the last good list (logged once per change).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from cistern.cachenode.peers.copies import check_node_name

__all__ = ["Member", "Membership", "parse_members"]

log = logging.getLogger(__name__)

CHECK_EVERY = 1.0


@dataclass(frozen=True)
class Member:
    node: str
    host: str
    port: int


def parse_members(text: str) -> list[Member]:
    data = json.loads(text)
    if not isinstance(data, dict) or not isinstance(data.get("members"), list):
        raise ValueError('expected {"members": [...]}')
    members = []
    for item in data["members"]:
        if not isinstance(item, dict):
            raise ValueError("a member must be a mapping")
        port = item.get("port")
        host = item.get("host")
        if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
            raise ValueError(f"member {item.get('node')!r}: bad port {port!r}")
        if not isinstance(host, str) or not host:
            raise ValueError(f"member {item.get('node')!r}: bad host {host!r}")
        members.append(Member(check_node_name(item.get("node")), host, port))
    return members


class Membership:
    def __init__(self, path: Path, self_node: str) -> None:
        self.path = path
        self.self_node = self_node
        self._lock = threading.Lock()
        self._members: list[Member] = []
        self._stamp: tuple[int, int, int] | None = None
        self._checked = 0.0
        self.reloads = 0
        self._refresh(force=True)

    def others(self) -> list[Member]:
        """Every member but this node, from the file as it is now (re-read if changed)."""
        self._refresh()
        with self._lock:
            return [m for m in self._members if m.node != self.self_node]

    def get(self, node: str) -> Member | None:
        return next((m for m in self.others() if m.node == node), None)

    def _refresh(self, force: bool = False) -> None:
        now = time.monotonic()
        with self._lock:
            if not force and now - self._checked < CHECK_EVERY:
                return
            self._checked = now
            try:
                st = os.stat(self.path)
            except OSError as exc:
                if self._stamp is not None or force:
                    log.warning("peer members file %s: %s", self.path, exc.strerror)
                self._stamp = None
                return
            stamp = (st.st_mtime_ns, st.st_ino, st.st_size)
            if stamp == self._stamp:
                return
            self._stamp = stamp
            try:
                members = parse_members(self.path.read_text())
            except (OSError, ValueError) as exc:
                log.error("peer members file %s: %s (keeping %d members)", self.path, exc,
                          len(self._members))
                return
            self._members = members
            self.reloads += 1
            log.info("peer members: %s", ", ".join(m.node for m in members) or "none")

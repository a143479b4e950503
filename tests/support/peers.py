"""Several cistern-node processes forming one WriteCache's peer network (issue 17).

Each node has its own mount, cache dir, control port and peer port; they share a token file
and a members file (what the operator publishes) and one bucket. Used by
tests/integration/peers and bench/peers_bench.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from .node import NodeProcess
from .s3server import free_port

__all__ = ["TOKEN", "Cluster", "HeldFiles", "SlowRelay"]

TOKEN = b"0123456789abcdef-test-token"
"""The shared token of in-process peer servers."""


class HeldFiles:
    """A peer server's handler holding ``files`` (key -> bytes), for in-process servers."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.announced: list[dict[str, Any]] = []

    def read_local(self, key: str, offset: int, length: int) -> bytes | None:
        data = self.files.get(key)
        return None if data is None else data[offset:offset + length]

    def on_announce(self, origin: str, header: dict[str, Any]) -> None:
        self.announced.append(header)

    def on_rename(self, origin: str, old: str, new: str) -> None:
        pass

    def on_drop(self, origin: str, key: str, upto: int | None) -> None:
        pass


class Cluster:
    def __init__(self, workdir: Path, bucket: str, endpoint: str, *, peer_timeout: float = 1.0,
                 dead_after: float = 2.0, transport: str = "auto") -> None:
        self.transport = transport
        self.workdir = workdir
        self.bucket = bucket
        self.endpoint = endpoint
        self.peer_timeout = peer_timeout
        self.dead_after = dead_after
        self.token = workdir / "peer-token"
        self.token.write_text(os.urandom(24).hex())
        self.members = workdir / "members.json"
        self.nodes: dict[str, NodeProcess] = {}
        self.ports: dict[str, int] = {}

    def add(self, name: str, *, upload_delay: float = 0.2,
            durability: dict[str, Any] | None = None) -> NodeProcess:
        """A node (not started) and its entry in the members file."""
        port = free_port()
        self.ports[name] = port
        self.publish()
        workdir = self.workdir / name
        workdir.mkdir()
        node = NodeProcess(workdir, f"s3://{self.bucket}", endpoint_url=self.endpoint,
                           frontend="pyfuse3", upload_delay=upload_delay, config={
                               "durability": {"level": "peers", "peers": 1,
                                              "peerTimeout": f"{self.peer_timeout}s",
                                              **(durability or {})},
                               "peers": {"listen": f"127.0.0.1:{port}", "nodeName": name,
                                         "membersFile": str(self.members),
                                         "tokenFile": str(self.token),
                                         "deadAfter": f"{self.dead_after}s",
                                         "transport": self.transport,
                                         "suspectFor": "30s"}})
        self.nodes[name] = node
        return node

    def publish(self) -> None:
        """Write the members file atomically, as a ConfigMap volume update would."""
        tmp = self.members.with_suffix(".tmp")
        tmp.write_text(json.dumps({"members": [
            {"node": n, "host": "127.0.0.1", "port": p} for n, p in self.ports.items()]}))
        os.replace(tmp, self.members)

    def start(self) -> Cluster:
        for node in self.nodes.values():
            node.start()
        return self

    def stop(self) -> None:
        for node in self.nodes.values():
            node.stop()


class SlowRelay:
    """A TCP relay to a peer server whose answers can be held back ``delay`` seconds each:
    a peer that is slow (a busy disk, a congested link), not dead."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.delay = 0.0
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True, name="slow-relay").start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            self._socks += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, False),
                             daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True),
                             daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, answers: bool) -> None:
        try:
            while data := src.recv(1 << 16):
                if answers and self.delay:
                    time.sleep(self.delay)  # the fault injected, not a synchronisation
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._server.close()
        for sock in self._socks:
            sock.close()

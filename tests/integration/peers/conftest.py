"""Three cistern-node processes on 127.0.0.1 forming one WriteCache's peer network.

Each node has its own mount, cache dir, control port and peer port; they share a token file
and a members file (what the operator publishes), and one bucket behind the fault proxy.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from support.node import NodeProcess
from support.s3server import free_port

PEER_TIMEOUT = 1.0
DEAD_AFTER = 2.0


class Cluster:
    def __init__(self, tmp_path: Path, bucket: str, endpoint: str) -> None:
        self.tmp_path = tmp_path
        self.bucket = bucket
        self.endpoint = endpoint
        self.token = tmp_path / "peer-token"
        self.token.write_text(os.urandom(24).hex())
        self.members = tmp_path / "members.json"
        self.nodes: dict[str, NodeProcess] = {}
        self.ports: dict[str, int] = {}

    def add(self, name: str, *, upload_delay: float = 0.2,
            durability: dict[str, Any] | None = None) -> NodeProcess:
        port = free_port()
        self.ports[name] = port
        self._publish()
        workdir = self.tmp_path / name
        workdir.mkdir()
        node = NodeProcess(workdir, f"s3://{self.bucket}", endpoint_url=self.endpoint,
                           frontend="pyfuse3", upload_delay=upload_delay, config={
                               "durability": {"level": "peers", "peers": 1,
                                              "peerTimeout": f"{PEER_TIMEOUT}s",
                                              **(durability or {})},
                               "peers": {"listen": f"127.0.0.1:{port}", "nodeName": name,
                                         "membersFile": str(self.members),
                                         "tokenFile": str(self.token),
                                         "deadAfter": f"{DEAD_AFTER}s", "suspectFor": "30s"}})
        self.nodes[name] = node
        return node

    def _publish(self) -> None:
        tmp = self.members.with_suffix(".tmp")
        tmp.write_text(json.dumps({"members": [
            {"node": n, "host": "127.0.0.1", "port": p} for n, p in self.ports.items()]}))
        os.replace(tmp, self.members)

    def start(self) -> None:
        for node in self.nodes.values():
            node.start()


@pytest.fixture
def cluster(tmp_path: Path, bucket: str, proxy: Any) -> Iterator[Callable[..., Cluster]]:
    made: list[Cluster] = []

    def make(**nodes: dict[str, Any]) -> Cluster:
        c = Cluster(tmp_path, bucket, proxy.endpoint)
        for name, options in nodes.items():
            c.add(name, **options)
        c.start()
        made.append(c)
        return c

    yield make
    for c in made:
        for node in c.nodes.values():
            node.stop()

"""Three cistern-node processes on 127.0.0.1, one bucket behind the fault proxy."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from support.peers import Cluster

PEER_TIMEOUT = 1.0
DEAD_AFTER = 2.0


@pytest.fixture
def cluster(tmp_path: Path, bucket: str, proxy: Any) -> Iterator[Callable[..., Cluster]]:
    made: list[Cluster] = []

    def make(**nodes: dict[str, Any]) -> Cluster:
        c = Cluster(tmp_path, bucket, proxy.endpoint, peer_timeout=PEER_TIMEOUT,
                    dead_after=DEAD_AFTER)
        made.append(c)
        for name, options in nodes.items():
            c.add(name, **options)
        return c.start()

    yield make
    for c in made:
        c.stop()

"""A core, a store client and a flusher wired as the daemon wires them, on a given store, for
the flusher and streamer unit tests (small parts, so that multipart paths run on KiBs)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from cistern.cachenode.core import ROOT_INO, CacheCore
from cistern.cachenode.flusher import Flusher
from cistern.cachenode.retry import RetryPolicy
from cistern.cachenode.storeclient import StoreClient
from cistern.config import FlushPolicy

__all__ = ["FAST", "PART", "POLICY", "Node"]

PART = 16 * 1024
FAST = RetryPolicy(base_delay=0.001, max_delay=0.005, deadline=5.0)
POLICY = FlushPolicy(upload_delay=0.0, multipart_threshold=4 * PART, part_size=PART,
                     max_concurrent_uploads=2)


class Node:
    """A core, a store client and a flusher as the daemon wires them."""

    def __init__(self, cache_dir: Path, store: Any, retry: RetryPolicy = FAST) -> None:
        self.store = store
        self.client = StoreClient(store, POLICY, retry=retry)
        self.core = CacheCore(cache_dir, self.client, flush=POLICY)
        self.flusher = Flusher(self.core, self.client, POLICY)

    def write(self, name: str, data: bytes, parent: int = ROOT_INO) -> int:
        handle, attr = self.core.create(parent, name, 0o644, os.O_WRONLY, 0, 0)
        self.core.write(handle, 0, data)
        self.core.release(handle)
        return attr.ino

    def flushed(self, timeout: float = 30.0) -> bool:
        return self.flusher.wait_idle(timeout, upto_seq=self.core.request_flush())

    def stored(self, key: str) -> bytes | None:
        path = Path(self.store.root) / key
        return path.read_bytes() if path.is_file() else None

    def close(self) -> None:
        self.flusher.stop()
        self.core.close()

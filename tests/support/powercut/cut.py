"""Taking a power cut: freeze, clone the device, copy the bucket, thaw."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from support.node import NodeProcess
from support.powercut.blockdev import CacheDevice, Snapshot
from support.powercut.verdict import copy_bucket, empty_bucket

__all__ = ["Cut", "live_node", "node_on", "power_cut"]


@dataclass
class Cut:
    snapshot: Snapshot
    bucket: str
    at_cut: dict[str, str]

    @contextmanager
    def recovered(self, workdir: Path, endpoint: str, config: dict[str, Any]
                  ) -> Iterator[NodeProcess]:
        """Mount the crash state and run a fresh node on it against this cut's bucket."""
        with self.snapshot.mounted() as root:
            node = node_on(workdir, self.bucket, endpoint, root / "cache",
                           workdir.with_name(workdir.name + "-mnt"), 0.0, config).start()
            try:
                yield node
            finally:
                node.stop()

    def discard(self, s3: Any) -> None:
        self.snapshot.discard()
        empty_bucket(s3, self.bucket)


def node_on(workdir: Path, bucket: str, endpoint: str, cache_dir: Path, mount: Path,
            upload_delay: float, config: dict[str, Any]) -> NodeProcess:
    workdir.mkdir(parents=True, exist_ok=True)
    return NodeProcess(workdir, f"s3://{bucket}", endpoint_url=endpoint, frontend="pyfuse3",
                       upload_delay=upload_delay, config=config, cache_dir=cache_dir,
                       mount=mount)


@contextmanager
def live_node(device: CacheDevice, tmp_path: Path, bucket: str, endpoint: str,
              upload_delay: float, config: dict[str, Any]) -> Iterator[NodeProcess]:
    """A started node caching on ``device`` (work dir ``tmp_path/live``, mounted at
    ``tmp_path/live-mnt``), stopped on the way out. Cuts taken meanwhile stay recoverable
    for as long as ``device`` is held (their clones live on it)."""
    node = node_on(tmp_path / "live", bucket, endpoint, device.mountpoint / "cache",
                   tmp_path / "live-mnt", upload_delay, config).start()
    try:
        yield node
    finally:
        node.stop()


def power_cut(node: NodeProcess, device: CacheDevice, s3: Any, bucket: str, name: str,
              also: subprocess.Popen[bytes] | None = None,
              on_frozen: Callable[[], None] | None = None) -> Cut:
    """Freeze the node (it sends nothing more) and ``also`` (a workload), call
    ``on_frozen``, take the device's and the bucket's state, let both go on. The node's
    page cache is not in the clone."""
    assert node.proc is not None
    os.killpg(node.proc.pid, signal.SIGSTOP)
    if also is not None:
        also.send_signal(signal.SIGSTOP)
    try:
        if on_frozen is not None:
            on_frozen()
        snapshot = device.snapshot()
        copy = f"{bucket}-{name}"
        at_cut = copy_bucket(s3, bucket, copy)
    finally:
        os.killpg(node.proc.pid, signal.SIGCONT)
        if also is not None:
            also.send_signal(signal.SIGCONT)
    return Cut(snapshot, copy, at_cut)

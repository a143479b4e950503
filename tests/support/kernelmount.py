"""A /dev/fuse front end serving a real ``CacheCore`` in the test process.

For tests that look at what reached the daemon (its counters, the data files) rather than at
a ``cistern-node`` process: a local-directory object store, the cache, and the front end's
``serve`` on a thread.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cistern.cachenode.core import CacheCore
from cistern.cachenode.kernel_frontend import KernelFrontend
from cistern.cachenode.store import LocalDirStore
from support.node import is_mounted


class KernelMount:
    """``frontend`` mounted on ``base/mnt`` over a core in ``base/cache``."""

    def __init__(self, base: Path, frontend: KernelFrontend) -> None:
        self.store = LocalDirStore(base / "objects")
        self.store.check()
        self.core = CacheCore(base / "cache", self.store)
        self.mount = base / "mnt"
        self.mount.mkdir()
        self.frontend = frontend
        self.frontend.mount(self.core, str(self.mount), allow_other=False,
                            fsname="cistern-test")
        self.thread = threading.Thread(target=self.frontend.serve, name="serve", daemon=True)
        self.thread.start()

    def status(self) -> dict[str, Any]:
        return self.frontend.status()

    def close(self) -> None:
        self.frontend.request_stop()
        self.thread.join(10)
        self.frontend.close()
        self.core.close()


@contextmanager
def kernel_mount(base: Path, frontend: KernelFrontend) -> Iterator[KernelMount]:
    """Mount, yield, unmount; fails if the mount outlives ``close``."""
    fs = KernelMount(base, frontend)
    try:
        yield fs
    finally:
        fs.close()
        assert not is_mounted(fs.mount)

"""Per-key operation locks: a second concurrent call on the same target is ABORTED."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from cistern.csi.errors import Aborted

__all__ = ["OperationLocks"]


class OperationLocks:
    """At most one operation in flight per key (a target path, a volume name).

    The CSI spec lets a plugin refuse a concurrent call on the same volume with ABORTED; the
    CO retries with backoff. Refusing instead of waiting keeps worker threads free.
    """

    def __init__(self) -> None:
        self._busy: set[str] = set()
        self._lock = threading.Lock()

    @contextmanager
    def hold(self, key: str) -> Iterator[None]:
        with self._lock:
            if key in self._busy:
                raise Aborted(f"an operation on {key} is already in progress; retry later")
            self._busy.add(key)
        try:
            yield
        finally:
            with self._lock:
                self._busy.discard(key)

"""One retry policy for every object-store call: exponential backoff, full jitter, a deadline."""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from cistern.cachenode.store import PermanentStoreError, StoreError, TemporaryStoreError

__all__ = ["RetryPolicy"]

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    base_delay: float = 0.1
    """First backoff in seconds; doubles per attempt."""
    max_delay: float = 10.0
    """Backoff ceiling."""
    deadline: float = 120.0
    """Give up (raise the last error) after this many seconds."""

    def call(self, what: str, fn: Callable[[], T], *,
             on_error: Callable[[StoreError], None] | None = None,
             stop: threading.Event | None = None) -> T:
        """Run ``fn`` until it succeeds, a permanent error occurs, or the deadline passes.

        ``on_error`` sees every failure (metrics, throttle feedback to the rate limiter).
        """
        start = time.monotonic()
        attempt = 0
        while True:
            try:
                return fn()
            except TemporaryStoreError as exc:
                if on_error:
                    on_error(exc)
                attempt += 1
                delay = random.uniform(0, min(self.max_delay, self.base_delay * 2 ** attempt))
                if time.monotonic() + delay - start > self.deadline:
                    raise
                log.debug("%s: %s; retry %d in %.2fs", what, exc, attempt, delay)
                if stop is not None:
                    if stop.wait(delay):
                        raise
                else:
                    time.sleep(delay)
            except PermanentStoreError as exc:
                if on_error:
                    on_error(exc)
                raise

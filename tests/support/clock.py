"""A clock that tests advance by hand, for code that takes a ``Clock`` (e.g. the rate limiters
in cistern.cachenode.ratelimit): no sleeping, exact times."""

from __future__ import annotations

import threading

__all__ = ["FakeClock"]


class FakeClock:
    """``now()`` returns what the test set; ``sleep()`` records the wait and advances."""

    def __init__(self, start: float = 1000.0) -> None:
        self.time = start
        self.sleeps: list[float] = []

    def now(self) -> float:
        return self.time

    def advance(self, seconds: float) -> None:
        self.time += seconds

    def sleep(self, seconds: float, stop: threading.Event | None = None) -> None:
        self.sleeps.append(seconds)
        self.time += seconds

"""Token buckets shared by all uploads of a node, and an adaptive request rate for throttling.

S3 answers bursts with 503 SlowDown. ``AdaptiveRate`` lowers the request rate multiplicatively
when the store throttles and raises it slowly while requests succeed (AIMD), never above the
configured ``maxRequestsPerSecond``.

Both read time through a ``Clock`` (``MonotonicClock`` unless told otherwise), so tests drive
them with a clock they advance themselves instead of sleeping.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Protocol

__all__ = ["AdaptiveRate", "Clock", "MonotonicClock", "TokenBucket"]


class Clock(Protocol):
    """Where the rate limiters read the time and wait."""

    def now(self) -> float:
        """Seconds on a monotonic scale."""
        ...

    def sleep(self, seconds: float, stop: threading.Event | None = None) -> None:
        """Wait ``seconds`` (returning early once ``stop`` is set)."""
        ...


class MonotonicClock:
    """The real clock: ``time.monotonic`` and a sleep that ``stop`` interrupts."""

    def now(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float, stop: threading.Event | None = None) -> None:
        if stop is not None:
            stop.wait(seconds)
        else:
            time.sleep(seconds)


class TokenBucket:
    """Blocking token bucket; ``rate`` None means unlimited. Thread-safe."""

    def __init__(self, rate: float | None, burst: float | None = None,
                 clock: Clock | None = None) -> None:
        self.clock: Clock = clock or MonotonicClock()
        self._lock = threading.Lock()
        self._rate = rate
        self._burst = burst
        self._tokens = self.capacity
        self._stamp = self.clock.now()

    @property
    def rate(self) -> float | None:
        return self._rate

    @property
    def capacity(self) -> float:
        if self._rate is None:
            return float("inf")
        return self._burst if self._burst is not None else max(self._rate, 1.0)

    def set_rate(self, rate: float | None) -> None:
        with self._lock:
            self._refill()
            self._rate = rate
            self._tokens = min(self._tokens, self.capacity) if rate is not None else float("inf")
            if rate is not None and self._tokens == float("inf"):
                self._tokens = self.capacity

    def _refill(self) -> None:
        now = self.clock.now()
        if self._rate is not None:
            self._tokens = min(self.capacity, self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now

    def refund(self, amount: float) -> None:
        """Give back tokens of a request that failed before it moved the bytes."""
        with self._lock:
            if self._rate is not None:
                self._tokens = min(self.capacity, self._tokens + amount)

    def acquire(self, amount: float, stop: threading.Event | None = None) -> float:
        """Take ``amount`` tokens, sleeping as needed; return the seconds waited.

        Amounts larger than the bucket are allowed: the bucket goes into debt, which keeps
        the long-run rate exact for big parts.
        """
        waited = 0.0
        with self._lock:
            self._refill()
            if self._rate is None:
                return 0.0
            self._tokens -= amount
            deficit = -self._tokens
            rate = self._rate
        if deficit > 0:
            waited = deficit / rate
            self.clock.sleep(waited, stop)
        return waited


class AdaptiveRate:
    """Requests-per-second limit that backs off on throttling and recovers on success."""

    def __init__(self, bucket: TokenBucket, ceiling: float | None,
                 decrease: float = 0.7, recovery_per_second: float = 0.5,
                 floor: float = 1.0) -> None:
        """Reads time through ``bucket.clock``."""
        self.bucket = bucket
        self._clock = bucket.clock
        self.ceiling = ceiling
        self._decrease = decrease
        self._recovery = recovery_per_second
        self._floor = floor
        self.lift_after = 5.0
        self._lock = threading.Lock()
        self._recent: deque[float] = deque(maxlen=512)
        self._last_cut = 0.0
        self._last_raise = self._clock.now()
        self.throttled_now = False

    def observed_rate(self) -> float:
        now = self._clock.now()
        with self._lock:
            while self._recent and now - self._recent[0] > 2.0:
                self._recent.popleft()
            return len(self._recent) / 2.0

    def on_success(self) -> None:
        now = self._clock.now()
        with self._lock:
            self._recent.append(now)
            rate = self.bucket.rate
            if rate is None or now - self._last_raise < 0.25:
                return
            # Time-based multiplicative recovery (+50 %/s by default, whatever the request
            # rate): one cut per congestion episode (at most one a second) is won back in
            # about a second of success.
            elapsed = min(now - self._last_raise, 1.0)
            self._last_raise = now
            new = rate * (1 + self._recovery) ** elapsed
            if self.ceiling is None and now - self._last_cut > self.lift_after:
                # No configured ceiling: once the store has stopped throttling for a while,
                # go back to unlimited (the limiter itself caps what we can observe).
                self.bucket.set_rate(None)
                self.throttled_now = False
                return
            if self.ceiling is not None and new >= self.ceiling:
                new = self.ceiling
            self.bucket.set_rate(new)
            self.throttled_now = self.ceiling is None or new < self.ceiling

    def _observed_unlocked(self, now: float) -> float:
        return sum(1 for t in self._recent if now - t <= 2.0) / 2.0

    def on_throttle(self) -> None:
        now = self._clock.now()
        with self._lock:
            if now - self._last_cut < 1.0:
                return
            self._last_cut = now
            self._last_raise = now
            # Cut from what is actually sent: a limit far above the send rate would make a
            # cut meaningless.
            observed = max(self._observed_unlocked(now), 2.0)
            current = self.bucket.rate
            current = observed if current is None else min(current, observed)
            self.bucket.set_rate(max(self._floor, current * self._decrease))
            self.throttled_now = True

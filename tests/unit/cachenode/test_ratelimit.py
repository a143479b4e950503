"""Token buckets and the adaptive request rate, on a clock the test advances (no sleeping)."""

from __future__ import annotations

import threading

import pytest

from cistern.cachenode.ratelimit import AdaptiveRate, MonotonicClock, TokenBucket
from support.clock import FakeClock


def test_unlimited_bucket_never_waits() -> None:
    clock = FakeClock()
    assert TokenBucket(None, clock=clock).acquire(10**12) == 0.0
    assert clock.sleeps == []


def test_bucket_goes_into_debt_for_large_amounts() -> None:
    clock = FakeClock()
    bucket = TokenBucket(1000.0, burst=1000.0, clock=clock)
    assert bucket.acquire(1000) == 0.0
    assert bucket.acquire(100) == pytest.approx(0.1)  # the debt: 100 tokens at 1000/s
    assert bucket.acquire(2500) == pytest.approx(2.5)  # bigger than the bucket: debt again
    assert clock.sleeps == [pytest.approx(0.1), pytest.approx(2.5)]


def test_the_long_run_rate_is_the_configured_rate() -> None:
    clock = FakeClock()
    bucket = TokenBucket(100.0, burst=100.0, clock=clock)
    start = clock.now()
    for _ in range(50):
        bucket.acquire(20)
    # 1,000 bytes at 100/s after a full 100-byte burst: 9 seconds, to the microsecond.
    assert clock.now() - start == pytest.approx(9.0)


def test_tokens_refill_with_time_up_to_the_burst() -> None:
    clock = FakeClock()
    bucket = TokenBucket(10.0, burst=10.0, clock=clock)
    bucket.acquire(10)
    clock.advance(0.5)
    assert bucket.acquire(5) == 0.0
    clock.advance(3600)  # idle for an hour: still only one burst
    assert bucket.acquire(10) == 0.0
    assert bucket.acquire(1) == pytest.approx(0.1)


def test_refund_returns_tokens_of_failed_requests() -> None:
    clock = FakeClock()
    bucket = TokenBucket(1000.0, burst=1000.0, clock=clock)
    bucket.acquire(1000)
    bucket.refund(1000)
    assert bucket.acquire(500) == 0.0
    assert clock.sleeps == []


def test_a_wait_goes_through_the_stop_event() -> None:
    stop = threading.Event()
    stop.set()  # the real clock returns at once when the flusher stops
    bucket = TokenBucket(1.0, burst=1.0, clock=MonotonicClock())
    bucket.acquire(1)
    assert bucket.acquire(3600, stop) == pytest.approx(3600.0)


def test_throttle_cuts_the_rate_and_success_restores_it() -> None:
    clock = FakeClock()
    bucket = TokenBucket(100.0, clock=clock)
    adaptive = AdaptiveRate(bucket, ceiling=100.0)
    for _ in range(300):  # 150 requests/s observed over the 2 s window
        adaptive.on_success()
    adaptive.on_throttle()
    assert bucket.rate == pytest.approx(70.0) and adaptive.throttled_now
    adaptive.on_throttle()  # same congestion episode: no second cut
    assert bucket.rate == pytest.approx(70.0)
    clock.advance(0.1)
    adaptive.on_success()  # raises at most every 0.25 s
    assert bucket.rate == pytest.approx(70.0)
    rates = []
    for _ in range(4):  # +50 %/s: 70 -> 100 takes ln(100/70)/ln(1.5) = 0.88 s
        clock.advance(0.25)
        adaptive.on_success()
        rates.append(bucket.rate)
    assert rates[:3] == sorted(rates[:3]) and rates[2] < 100.0
    assert rates[3] == 100.0, rates
    assert not adaptive.throttled_now


def test_without_a_ceiling_throttling_installs_a_limit_then_lifts_it() -> None:
    clock = FakeClock()
    bucket = TokenBucket(None, clock=clock)
    adaptive = AdaptiveRate(bucket, ceiling=None)
    adaptive.on_throttle()
    assert bucket.rate == pytest.approx(1.4) and adaptive.throttled_now  # 0.7 of the 2/s floor
    for _ in range(20):  # five seconds of success: limited still
        clock.advance(0.25)
        adaptive.on_success()
        assert bucket.rate is not None
    clock.advance(0.25)
    adaptive.on_success()  # past lift_after (5 s) since the cut: unlimited again
    assert bucket.rate is None and not adaptive.throttled_now


def test_the_cut_starts_from_what_is_actually_sent() -> None:
    clock = FakeClock()
    bucket = TokenBucket(1000.0, clock=clock)
    adaptive = AdaptiveRate(bucket, ceiling=1000.0)
    for _ in range(20):  # 10 requests/s observed, far below the limit
        adaptive.on_success()
    adaptive.on_throttle()
    assert bucket.rate == pytest.approx(7.0)


def test_old_requests_leave_the_observed_rate() -> None:
    clock = FakeClock()
    adaptive = AdaptiveRate(TokenBucket(None, clock=clock), ceiling=None)
    for _ in range(10):
        adaptive.on_success()
    assert adaptive.observed_rate() == 5.0
    clock.advance(2.5)
    assert adaptive.observed_rate() == 0.0

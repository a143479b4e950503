"""Token buckets and the adaptive request rate (no servers)."""

from __future__ import annotations

import time

from cistern.cachenode.ratelimit import AdaptiveRate, TokenBucket


def test_unlimited_bucket_never_waits() -> None:
    assert TokenBucket(None).acquire(10**12) == 0.0


def test_bucket_goes_into_debt_for_large_amounts() -> None:
    bucket = TokenBucket(1000.0, burst=1000.0)
    assert bucket.acquire(1000) == 0.0
    waited = bucket.acquire(100)
    assert 0.05 <= waited <= 0.2  # the debt: 100 tokens at 1000/s


def test_refund_returns_tokens_of_failed_requests() -> None:
    bucket = TokenBucket(1000.0, burst=1000.0)
    bucket.acquire(1000)
    bucket.refund(1000)
    assert bucket.acquire(500) == 0.0


def test_throttle_cuts_the_rate_and_success_restores_it() -> None:
    bucket = TokenBucket(100.0)
    adaptive = AdaptiveRate(bucket, ceiling=100.0)
    for _ in range(300):  # ~150 requests/s observed over the 2 s window
        adaptive.on_success()
    adaptive.on_throttle()
    assert bucket.rate == 70.0 and adaptive.throttled_now
    adaptive.on_throttle()  # same congestion episode: no second cut
    assert bucket.rate == 70.0
    deadline = time.monotonic() + 5
    while bucket.rate != 100.0 and time.monotonic() < deadline:
        adaptive.on_success()
        time.sleep(0.05)
    assert bucket.rate == 100.0, "the rate never recovered to the ceiling"
    assert not adaptive.throttled_now


def test_without_a_ceiling_throttling_installs_a_limit_then_lifts_it() -> None:
    bucket = TokenBucket(None)
    adaptive = AdaptiveRate(bucket, ceiling=None)
    adaptive.on_throttle()
    assert bucket.rate is not None and bucket.rate >= 1.0
    deadline = time.monotonic() + 10
    while bucket.rate is not None and time.monotonic() < deadline:
        adaptive.on_success()
        time.sleep(0.02)
    assert bucket.rate is None


def test_the_cut_starts_from_what_is_actually_sent() -> None:
    bucket = TokenBucket(1000.0)
    adaptive = AdaptiveRate(bucket, ceiling=1000.0)
    for _ in range(20):  # ~10 requests/s observed, far below the limit
        adaptive.on_success()
    adaptive.on_throttle()
    assert bucket.rate is not None and bucket.rate <= 10.0

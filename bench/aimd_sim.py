"""``python -m bench.smoothing --aimd-sim SECONDS``: the daemon's own ``AdaptiveRate`` and
``TokenBucket`` driven with fixed 503 shares, no servers (what the request rate settles at)."""

from __future__ import annotations

import random
import threading
import time

from cistern.cachenode.ratelimit import AdaptiveRate, TokenBucket

__all__ = ["aimd_table", "simulate_aimd"]


def simulate_aimd(share: float, ceiling: float | None, seconds: float,
                  latency: float = 0.035, seed: int = 1) -> dict[str, float | None]:
    """Drive the daemon's own ``AdaptiveRate``/``TokenBucket`` (one sender, real time) with
    a throttle share that does not depend on load; return sent and successful requests/s and
    the request-rate limit over the second half."""
    bucket = TokenBucket(ceiling)
    adaptive = AdaptiveRate(bucket, ceiling)
    rng = random.Random(seed)
    start = time.monotonic()
    sent = ok = 0
    trace: list[float | None] = []
    while time.monotonic() - start < seconds:
        bucket.acquire(1)
        time.sleep(latency)
        sent += 1
        if rng.random() < share:
            adaptive.on_throttle()
        else:
            adaptive.on_success()
            ok += 1
        trace.append(bucket.rate)
    half = trace[len(trace) // 2:]
    late = [r for r in half if r]
    return {"share": share, "ceiling": ceiling, "sent_per_second": sent / seconds,
            "ok_per_second": ok / seconds, "limit_min": min(late, default=None),
            "limit_mean": sum(late) / len(late) if late else None,
            "limit_max": max(late, default=None),
            "unlimited_share": (len(half) - len(late)) / len(half) if half else None}


def aimd_table(seconds: float) -> None:
    """Print the model's request rates for three 503 shares, with and without a ceiling."""
    cases = [(share, ceiling) for share in (0.09, 0.2, 0.3) for ceiling in (None, 20.0)]
    out: list[dict[str, float | None]] = [{} for _ in cases]

    def one(i: int) -> None:
        out[i] = simulate_aimd(cases[i][0], cases[i][1], seconds)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print("share ceiling  sent/s  ok/s  limit min  limit mean  limit max  unlimited "
          "(second half; limit over the limited samples)")
    for row in out:
        print(f"{row['share']:5.2f} {row['ceiling']!s:>7} {row['sent_per_second']:7.2f} "
              f"{row['ok_per_second']:5.2f} {row['limit_min'] or 0:10.2f} "
              f"{row['limit_mean'] or 0:11.2f} {row['limit_max'] or 0:10.2f} "
              f"{(row['unlimited_share'] or 0) * 100:8.0f} %")

"""``python -m bench.smoothing``: what the node's upload smoothing does to a checkpoint burst.

A writer drops a burst of large files (fsync'd) into a real ``cistern-node`` mount with
``uploadDelay: 0``; the store is moto behind the latency/fault proxy (35 ms per request).
Every ``--interval`` seconds the harness samples the node's ``cistern_uploaded_bytes_total``,
``cistern_dirty_bytes``, ``cistern_s3_throttles_total`` and
``cistern_upload_rate_limit_requests`` and the proxy's forwarded byte count; afterwards the
proxy's ordered log (completion time of every request) gives, independently of the daemon,
the bytes S3 accepted per second (successful ``PART``/``PUT`` requests times their size).

The runs share one moto + proxy (a fresh bucket each):

``limited``    ``maxBytesPerSecond`` = ``--limit`` (default 64 MiB/s)
``unlimited``  the same burst without a byte limit, for comparison
``throttled``  ``--limit`` again, with ``--error-rate`` (default 30 %) of requests answered
               ``503 SlowDown``: shows the adaptive request rate (AIMD)
``throttled-unlimited``  the 503 run without a byte limit, where only the request rate binds

Writes ``--out`` (JSON), ``--png`` (rate and dirty bytes over time, the limit as a line).
``--aimd-sim SECONDS`` only drives the daemon's ``AdaptiveRate`` with fixed 503 shares (no
servers); ``--replot`` only redraws the PNG from the JSON. Findings: docs/smoothing.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.aimd_sim import aimd_table
from bench.report import machine_info
from bench.s3env import S3Env
from bench.smoothing_plot import plot
from cistern.logs import setup_logging
from tests.support.node import NodeProcess

logger = logging.getLogger(__name__)

MiB = 1 << 20
GiB = 1 << 30
RUNS = ("limited", "unlimited", "throttled", "throttled-unlimited")
#: run name -> (byte limit on, 503 injection on)
_RUN_KINDS = {
    "limited": (True, False),
    "unlimited": (False, False),
    "throttled": (True, True),
    "throttled-unlimited": (False, True),
}
_METRICS = {
    "uploaded": "cistern_uploaded_bytes_total",
    "dirty": "cistern_dirty_bytes",
    "throttles": "cistern_s3_throttles_total",
    "request_limit": "cistern_upload_rate_limit_requests",
    "rate_limited_seconds": "cistern_rate_limited_seconds_total",
}


@dataclass(frozen=True)
class SmoothingConfig:
    burst: int = 2 * GiB
    """Bytes written per run (limited and unlimited)."""
    file_size: int = 128 * MiB
    """Size of each file of the burst."""
    throttled_burst: int = 512 * MiB
    """Bytes written in the 503 run (smaller: the adaptive rate makes it slow)."""
    limit: float = 64 * MiB
    """maxBytesPerSecond of the limited and throttled runs."""
    max_requests_per_second: float | None = None
    """maxRequestsPerSecond (the ceiling of the adaptive rate); None: unset."""
    latency: float = 0.035
    """Seconds the proxy adds to every S3 request."""
    error_rate: float = 0.3
    """Share of requests answered 503 SlowDown in the throttled run."""
    part_size: int = 16 * MiB
    max_concurrent_uploads: int = 4
    interval: float = 0.25
    """Sampling period in seconds."""
    run_timeout: float = 300.0
    """Give up on a run that is not durable after this many seconds."""
    runs: tuple[str, ...] = RUNS
    workdir: str | None = None
    frontend: str = "pyfuse3"


@dataclass
class Sample:
    t: float
    """Seconds since the writer started."""
    uploaded: float
    dirty: float
    throttles: float
    request_limit: float
    rate_limited_seconds: float
    proxy_bytes_in: int
    written: int


@dataclass
class RunResult:
    name: str
    burst: int
    files: int
    limit: float | None
    error_rate: float
    writer_seconds: float = 0.0
    durable_seconds: float | None = None
    """Writer start until the last object completed (proxy log); None: timed out."""
    dirty_zero_seconds: float | None = None
    """Writer start until the first sample with zero dirty bytes after the burst."""
    samples: list[Sample] = field(default_factory=list)
    completions: list[tuple[float, str, int]] = field(default_factory=list)
    """(seconds since writer start, kind, bytes) of every successful PUT/PART in the log."""
    rejected: list[tuple[float, str]] = field(default_factory=list)
    """(seconds since writer start, kind) of every request the proxy answered 503."""
    proxy_counts: dict[str, int] = field(default_factory=dict)
    daemon_requests: dict[str, float] = field(default_factory=dict)
    """``cistern_s3_requests_total`` by operation at the end of the run (attempts sent)."""
    daemon_errors: dict[str, float] = field(default_factory=dict)
    """``cistern_s3_errors_total`` by code at the end of the run."""
    objects_ok: bool = False
    error: str | None = None


# ------------------------------------------------------------------ measuring one run


def _labelled(node: NodeProcess, metric: str, label: str) -> dict[str, float]:
    """Values of one labelled counter by the value of ``label``."""
    out: dict[str, float] = {}
    prefix = metric + "{"
    for line in node.metrics().splitlines():
        if not line.startswith(prefix):
            continue
        sample, _, value = line.rpartition(" ")
        labels = dict(part.split("=", 1) for part in
                      sample[len(prefix):].rstrip("}").split(",") if "=" in part)
        key = labels.get(label, "").strip('"')
        out[key] = out.get(key, 0.0) + float(value)
    return out


def _metrics(node: NodeProcess) -> dict[str, float]:
    wanted = {v: k for k, v in _METRICS.items()}
    out = dict.fromkeys(_METRICS, 0.0)
    for line in node.metrics().splitlines():
        if line.startswith("#"):
            continue
        sample, _, value = line.rpartition(" ")
        name = wanted.get(sample.split("{", 1)[0])
        if name is not None:
            out[name] += float(value)
    return out


class _Writer(threading.Thread):
    """Writes the burst as fast as the mount takes it; fsyncs every file."""

    def __init__(self, directory: Path, files: int, file_size: int) -> None:
        super().__init__(name="burst-writer", daemon=True)
        self.directory = directory
        self.files = files
        self.file_size = file_size
        self.written = 0
        self.started = 0.0
        self.finished: float | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        block = os.urandom(4 * MiB)
        try:
            self.started = time.time()
            for index in range(self.files):
                path = self.directory / f"shard-{index:03d}.bin"
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                try:
                    left = self.file_size
                    while left > 0:
                        n = os.write(fd, block[:min(left, len(block))])
                        left -= n
                        self.written += n
                    os.fsync(fd)
                finally:
                    os.close(fd)
            self.finished = time.time()
        except BaseException as exc:  # noqa: BLE001 - reported by the harness
            self.error = exc


def _completions(env: S3Env, t0: float, file_size: int, part_size: int
                 ) -> tuple[list[tuple[float, str, int]], list[tuple[float, str]], float | None]:
    """Successful PUT/PART requests with their sizes, and the last object completion time.

    The proxy log has no sizes: a part's size follows from the file size and the number of
    parts of that key that completed before it (exact when file_size is a multiple of
    part_size, as in this benchmark).
    """
    seen: dict[str, int] = {}
    out: list[tuple[float, str, int]] = []
    rejected: list[tuple[float, str]] = []
    last_object: float | None = None
    for entry in env.proxy.log():
        if entry.status == 503:
            rejected.append((entry.time - t0, entry.kind))
        if entry.status != 200:
            continue
        if entry.kind == "PART":
            k = seen.get(entry.key, 0)
            size = max(0, min(part_size, file_size - k * part_size))
            seen[entry.key] = k + 1
            out.append((entry.time - t0, "PART", size))
        elif entry.kind == "PUT":
            out.append((entry.time - t0, "PUT", file_size))
        if entry.kind in ("PUT", "COMPLETE_MPU"):
            last_object = entry.time - t0
    return out, rejected, last_object


def run_once(env: S3Env, cfg: SmoothingConfig, name: str, root: Path) -> RunResult:
    limited, throttled = _RUN_KINDS[name]
    limit = cfg.limit if limited else None
    error_rate = cfg.error_rate if throttled else 0.0
    burst = cfg.throttled_burst if throttled else cfg.burst
    files = max(1, burst // cfg.file_size)
    result = RunResult(name, files * cfg.file_size, files, limit, error_rate)
    bucket = f"smoothing-{name}-{os.getpid()}"
    env.create_bucket(bucket)
    flush: dict[str, Any] = {
        "uploadDelay": 0, "partSize": cfg.part_size,
        "maxConcurrentUploads": cfg.max_concurrent_uploads,
    }
    if limit is not None:
        flush["maxBytesPerSecond"] = int(limit)
    if cfg.max_requests_per_second is not None:
        flush["maxRequestsPerSecond"] = cfg.max_requests_per_second
    workdir = root / name
    workdir.mkdir()
    node = NodeProcess(workdir, f"s3://{bucket}", endpoint_url=env.proxy_endpoint,
                       frontend=cfg.frontend, upload_delay=0.0, config={"flush": flush})
    node.start()
    try:
        env.proxy.set(error_rate=0.0)
        env.proxy.reset()
        env.proxy.set(error_rate=error_rate)
        target = node.mount / "ckpt"
        target.mkdir()
        writer = _Writer(target, files, cfg.file_size)
        logger.info("%s: %d x %d MiB, limit %s, 503 rate %.0f%%", name, files,
                    cfg.file_size // MiB, f"{limit / MiB:.0f} MiB/s" if limit else "none",
                    error_rate * 100)
        writer.start()
        while not writer.started:
            time.sleep(0.001)
        t0 = writer.started
        deadline = time.monotonic() + cfg.run_timeout
        next_tick = time.monotonic()
        while True:
            m = _metrics(node)
            proxy_in = int(env.proxy.stats()["bytes_in"])
            now = time.time()
            result.samples.append(Sample(
                round(now - t0, 4), m["uploaded"], m["dirty"], m["throttles"],
                m["request_limit"], m["rate_limited_seconds"], proxy_in, writer.written))
            if writer.error is not None:
                raise RuntimeError(f"writer failed: {writer.error}")
            if (writer.finished is not None and m["dirty"] == 0
                    and m["uploaded"] >= result.burst):
                result.dirty_zero_seconds = now - t0
                break
            if time.monotonic() > deadline:
                result.error = f"not durable after {cfg.run_timeout:.0f}s"
                logger.warning("%s: %s", name, result.error)
                break
            next_tick += cfg.interval
            time.sleep(max(0.0, next_tick - time.monotonic()))
        writer.join(timeout=cfg.run_timeout)
        if writer.finished is not None:
            result.writer_seconds = writer.finished - t0
        env.proxy.set(error_rate=0.0)
        result.completions, result.rejected, last = _completions(env, t0, cfg.file_size,
                                                                 cfg.part_size)
        result.durable_seconds = last if result.error is None else None
        result.proxy_counts = env.proxy.counts()
        result.daemon_requests = _labelled(node, "cistern_s3_requests_total", "op")
        result.daemon_errors = _labelled(node, "cistern_s3_errors_total", "code")
        listed = env.listing(bucket, "ckpt/")
        result.objects_ok = len(listed) == files and all(
            size == cfg.file_size for size in listed.values())
        if not result.objects_ok and result.error is None:
            result.error = f"bucket holds {len(listed)} of {files} objects with the right size"
    finally:
        node.stop()
        env.delete_bucket(bucket)
    return result


# ------------------------------------------------------------------ statistics


def per_second(events: list[tuple[float, int]], start: float, end: float,
               width: float = 1.0) -> list[float]:
    """Bytes per second in consecutive bins of ``width`` seconds from ``start`` to ``end``."""
    bins = [0.0] * max(1, math.ceil((end - start) / width))
    for t, size in events:
        if start <= t < start + len(bins) * width:
            bins[int((t - start) // width)] += size / width
    return bins


def _p95(values: list[float]) -> float:
    ordered = sorted(values)
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]


def summarize(result: RunResult) -> dict[str, Any]:
    events = [(t, size) for t, _kind, size in result.completions]
    end = result.durable_seconds or (result.samples[-1].t if result.samples else 0.0)
    full = math.floor(end)  # whole seconds only: the last partial bin would understate
    bins = per_second(events, 0.0, max(full, 1))
    metric_events: list[tuple[float, int]] = []
    previous = 0.0
    for s in result.samples:
        if s.uploaded > previous:
            metric_events.append((s.t, int(s.uploaded - previous)))
            previous = s.uploaded
    metric_bins = per_second(metric_events, 0.0, max(full, 1))
    window = 5
    sliding = [sum(bins[i:i + window]) / window for i in range(max(0, len(bins) - window + 1))]
    total = sum(size for _t, size in events)
    last = result.samples[-1] if result.samples else None
    return {
        "name": result.name,
        "burst_bytes": result.burst,
        "files": result.files,
        "limit_bytes_per_second": result.limit,
        "error_rate": result.error_rate,
        "writer_seconds": round(result.writer_seconds, 2),
        "writer_bytes_per_second": (result.burst / result.writer_seconds
                                    if result.writer_seconds else None),
        "durable_seconds": (round(result.durable_seconds, 2)
                            if result.durable_seconds is not None else None),
        "dirty_zero_seconds": (round(result.dirty_zero_seconds, 2)
                               if result.dirty_zero_seconds is not None else None),
        "proxy_accepted_bytes": total,
        "average_bytes_per_second": total / end if end else None,
        "per_second_mean": sum(bins) / len(bins) if bins else 0.0,
        "per_second_p95": _p95(bins),
        "per_second_max": max(bins) if bins else 0.0,
        "window_5s_max": max(sliding, default=0.0),
        "metric_per_second_p95": _p95(metric_bins),
        "metric_per_second_max": max(metric_bins) if metric_bins else 0.0,
        "peak_dirty_bytes": max((s.dirty for s in result.samples), default=0.0),
        "throttles": last.throttles if last else 0.0,
        "proxy_503": result.proxy_counts.get("THROTTLED", 0),
        "min_request_limit": min((s.request_limit for s in result.samples
                                  if s.request_limit > 0), default=None),
        "rate_limited_seconds": last.rate_limited_seconds if last else 0.0,
        "proxy_counts": result.proxy_counts,
        "proxy_503_by_kind": dict(sorted(Counter(kind for _t, kind in result.rejected).items())),
        "daemon_requests": result.daemon_requests,
        "daemon_errors": result.daemon_errors,
        "metric_uploaded_bytes": last.uploaded if last else 0.0,
        "objects_ok": result.objects_ok,
        "error": result.error,
        "per_second_bins": bins,
    }


def _size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    text = text.strip().lower().removesuffix("ib").removesuffix("b").removesuffix("i")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.smoothing",
        description="Measure Cistern's upload smoothing (maxBytesPerSecond token bucket, "
                    "adaptive request rate on 503 SlowDown) on a checkpoint burst over moto "
                    "behind a latency proxy. Writes a JSON result and a PNG plot.")
    parser.add_argument("--burst", default="2G", help="bytes per run (default 2G)")
    parser.add_argument("--file-size", default="128M", help="size of each file (default 128M)")
    parser.add_argument("--throttled-burst", default="512M",
                        help="bytes in the 503 run (default 512M)")
    parser.add_argument("--limit", default="64M",
                        help="maxBytesPerSecond of the limited runs (default 64M = 64 MiB/s)")
    parser.add_argument("--max-rps", type=float, default=None,
                        help="maxRequestsPerSecond (default: unset)")
    parser.add_argument("--latency-ms", type=float, default=35.0)
    parser.add_argument("--error-rate", type=float, default=0.3,
                        help="503 SlowDown share in the throttled run (default 0.3)")
    parser.add_argument("--part-size", default="16M")
    parser.add_argument("--concurrency", type=int, default=4, help="maxConcurrentUploads")
    parser.add_argument("--interval", type=float, default=0.25, help="sampling period (s)")
    parser.add_argument("--run-timeout", type=float, default=300.0)
    parser.add_argument("--runs", default=",".join(RUNS), help="comma list of " + ",".join(RUNS))
    parser.add_argument("--frontend", default="pyfuse3")
    parser.add_argument("--workdir", help="directory for mounts and caches (default /tmp)")
    parser.add_argument("--out", default="bench/results/smoothing.json")
    parser.add_argument("--png", default="docs/smoothing.png")
    parser.add_argument("--aimd-sim", type=float, metavar="SECONDS", default=None,
                        help="only drive the daemon's AdaptiveRate with fixed 503 shares "
                        "(9, 20, 30 %%) for SECONDS and print the request rates")
    parser.add_argument("--replot", action="store_true",
                        help="only redraw --png from an existing --out JSON")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    setup_logging("debug" if args.verbose else "info")
    if args.aimd_sim:
        aimd_table(args.aimd_sim)
        return
    if args.replot:
        plot(json.loads(Path(args.out).read_text()), Path(args.png))
        print(f"wrote {args.png}")
        return
    runs = tuple(r.strip() for r in args.runs.split(",") if r.strip())
    unknown = set(runs) - set(RUNS)
    if unknown:
        parser.error(f"unknown runs {sorted(unknown)}")
    cfg = SmoothingConfig(
        burst=_size(args.burst), file_size=_size(args.file_size),
        throttled_burst=_size(args.throttled_burst), limit=float(_size(args.limit)),
        max_requests_per_second=args.max_rps, latency=args.latency_ms / 1000.0,
        error_rate=args.error_rate, part_size=_size(args.part_size),
        max_concurrent_uploads=args.concurrency, interval=args.interval,
        run_timeout=args.run_timeout, runs=runs, workdir=args.workdir, frontend=args.frontend)
    started = time.time()
    load_at_start = os.getloadavg()
    results: list[RunResult] = []
    with tempfile.TemporaryDirectory(prefix="cistern-smoothing-", dir=cfg.workdir) as tmp, \
            S3Env(cfg.latency, 0.0) as env:
        for name in runs:
            try:
                results.append(run_once(env, cfg, name, Path(tmp)))
            except Exception as exc:  # noqa: BLE001 - report the run as failed, go on
                logger.exception("run %s failed", name)
                failed = RunResult(name, 0, 0, None, 0.0, error=str(exc))
                results.append(failed)
    machine = machine_info(cfg.workdir)
    # machine_info() runs after the runs: its load average is the one at the end.
    machine["load_average_at_start"] = load_at_start
    data: dict[str, Any] = {
        "load_average_at_end": os.getloadavg(),
        "command": "python -m bench.smoothing " + " ".join(argv or sys.argv[1:]),
        "machine": machine,
        "config": asdict(cfg),
        "total_seconds": round(time.time() - started, 1),
        "runs": [{"name": r.name, "summary": summarize(r),
                  "samples": [asdict(s) for s in r.samples],
                  "completions": r.completions, "rejected": r.rejected} for r in results],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {out}")
    plot(data, Path(args.png))
    print(f"wrote {args.png}")
    for run in data["runs"]:
        s = run["summary"]
        print(f"{s['name']:>10}: writer {s['writer_seconds']}s, durable {s['durable_seconds']}s, "
              f"per-second mean {s['per_second_mean'] / MiB:.1f} MiB/s, "
              f"p95 {s['per_second_p95'] / MiB:.1f} MiB/s, max {s['per_second_max'] / MiB:.1f}, "
              f"5 s max {s['window_5s_max'] / MiB:.1f}, "
              f"peak dirty {s['peak_dirty_bytes'] / MiB:.0f} MiB, throttles {s['throttles']:.0f} "
              f"(proxy 503s {s['proxy_503']}), "
              f"min request limit {s['min_request_limit']}, error {s['error']}")
    if any(r.error for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()

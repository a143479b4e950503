"""``python -m bench.fuse_requests``: which FUSE requests ``cp -r`` sends per new file, and
where the daemon's time goes for each.

Mounts the passthrough front end in this process over a real ``CacheCore`` and a
local-directory store, runs the daemon's spares thread the way
``daemon.py`` does, copies small files in with ``cp -r`` a few times and prints, per round:

* the wall time per file and this process's CPU time per file, user and kernel (every
  daemon thread: the reading thread and its polling, the spares thread, the intent log's
  batches);
* every opcode the kernel sent, per file, with the mean time its handler took (from the
  parsed request to the reply payload; not the wait in /dev/fuse);
* the core's share of the four hot requests (``find``, ``create``, ``getattr``,
  ``release``): the rest of a handler is the front end (packing, the session file, the
  backing-file ioctls).

Needs root, /dev/fuse and a kernel with FUSE passthrough (6.9+). The figures are per file;
on a shared machine compare rounds of the same run only.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench import workloads
from cistern.cachenode import kernel_fuse as kf
from cistern.cachenode.core import CacheCore
from cistern.cachenode.fuse_passthrough import PassthroughFrontend, probe_passthrough
from cistern.cachenode.store import LocalDirStore

_CORE_STEPS = ("find", "create", "getattr", "release")


class _Clock:
    """Counts and seconds per label, filled from the request threads."""

    def __init__(self) -> None:
        self.counts: collections.Counter[Any] = collections.Counter()
        self.seconds: collections.defaultdict[Any, float] = collections.defaultdict(float)

    def timed(self, label: Any, call: Any) -> Any:
        def run(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return call(*args, **kwargs)
            finally:
                self.seconds[label] += time.perf_counter() - start
                self.counts[label] += 1
        return run


class _CountingFrontend(PassthroughFrontend):
    """The passthrough front end with every handler timed and every request counted."""

    def __init__(self, clock: _Clock, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.clock = clock

    def _bind(self, core: Any, mountpoint: str) -> None:
        super()._bind(core, mountpoint)
        for opcode, handler in enumerate(self._handlers):
            if handler is not None:
                self._handlers[opcode] = self.clock.timed(opcode, handler)

    def _receiver(self, buf: bytearray) -> Any:
        receive = super()._receiver(buf)
        counts = self.clock.counts

        def counted() -> int:
            got = receive()
            opcode = kf.IN_HEADER.unpack_from(buf, 0)[1]
            counts[("sent", opcode)] += 1
            return got
        return counted


class _TimedCore:
    """The core with its hot-path calls timed; everything else passes through."""

    def __init__(self, core: Any, clock: _Clock) -> None:
        self._core = core
        for name in _CORE_STEPS:
            setattr(self, name, clock.timed(f"core.{name}", getattr(core, name)))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._core, name)


def _keep_spares(core: Any, stop: threading.Event) -> None:
    """What the daemon's spares thread does (``daemon._keep_spares``)."""
    while not stop.is_set():
        woken = core.spares_wanted.wait(1.0)
        core.apply_journal_intents()
        if woken:
            core.make_spares()


def measure(files: int, rounds: int, workdir: Path, spin: float = 100e-6) -> list[dict[str, Any]]:
    src = workdir / "src"
    workloads.make_small_files(src, files, 4096)
    clock = _Clock()
    store = LocalDirStore(workdir / "objects")
    store.check()
    core = CacheCore(workdir / "cache", store)
    mount = workdir / "mnt"
    mount.mkdir()
    frontend = _CountingFrontend(clock, threads=8, spin=spin)
    frontend.mount(_TimedCore(core, clock), str(mount), allow_other=False,
                   fsname="cistern-requests")
    serve = threading.Thread(target=frontend.serve, name="serve", daemon=True)
    serve.start()
    stop = threading.Event()
    spares = threading.Thread(target=_keep_spares, args=(core, stop), daemon=True)
    spares.start()
    results = []
    try:
        for round_ in range(rounds):
            clock.counts.clear()
            clock.seconds.clear()
            os.sync()
            wall, cpu = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
            subprocess.run(["cp", "-r", str(src), str(mount / f"copy-{round_}")],
                           check=True, timeout=900)
            wall = time.perf_counter() - wall
            time.sleep(0.5)  # the RELEASEs of the last files
            used = resource.getrusage(resource.RUSAGE_SELF)
            results.append(_round(files, wall, used.ru_utime - cpu.ru_utime,
                                  used.ru_stime - cpu.ru_stime, clock))
    finally:
        stop.set()
        spares.join(5)
        frontend.request_stop()
        serve.join(10)
        frontend.close()
        core.close()
    return results


def _round(files: int, wall: float, user: float, system: float,
           clock: _Clock) -> dict[str, Any]:
    requests = {kf.OPCODE_NAMES.get(key[1], str(key[1])): n / files
                for key, n in clock.counts.items() if isinstance(key, tuple)}
    handlers = {kf.OPCODE_NAMES.get(op, str(op)): clock.seconds[op] / clock.counts[op] * 1e6
                for op in clock.counts if isinstance(op, int)}
    core = {label: clock.seconds[label] / clock.counts[label] * 1e6
            for label in clock.counts if isinstance(label, str)}
    return {"wall_us_per_file": wall / files * 1e6,
            "cpu_us_per_file": (user + system) / files * 1e6,
            "user_cpu_us_per_file": user / files * 1e6,
            "system_cpu_us_per_file": system / files * 1e6,
            "requests_per_file": requests, "handler_us": handlers, "core_us": core,
            "load": os.getloadavg()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fuse_requests",
                                     description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--files", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", help="where to mount and copy (default: a temp dir)")
    parser.add_argument("--out", help="also write the rounds as JSON here")
    parser.add_argument("--spin", type=float, default=100e-6,
                        help="seconds the reading thread polls /dev/fuse before it sleeps "
                             "(the front end's ``spin``; default 100e-6)")
    args = parser.parse_args(argv)
    works, why = probe_passthrough()
    if not works:
        print(f"fuse_requests: {why}", file=sys.stderr)
        return 2
    parent = Path(args.workdir) if args.workdir else None
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="cistern-requests-", dir=parent))
    try:
        results = measure(args.files, args.rounds, workdir, args.spin)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    for index, result in enumerate(results):
        load = " ".join(f"{x:.1f}" for x in result["load"])
        print(f"round {index}: {result['wall_us_per_file']:.1f} us/file wall, "
              f"{result['cpu_us_per_file']:.1f} us/file daemon CPU, of which "
              f"{result['system_cpu_us_per_file']:.1f} in the kernel (load {load})")
        for name, per_file in sorted(result["requests_per_file"].items(),
                                     key=lambda item: -item[1]):
            took = result["handler_us"].get(name)
            print(f"  {name:12} {per_file:6.3f} per file"
                  + (f"  {took:7.1f} us" if took is not None else "  (no handler)"))
        for label, took in sorted(result["core_us"].items()):
            print(f"    {label:14} {took:7.1f} us")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    if len(results) > 1:
        print(f"median over rounds 1..{len(results) - 1}: "
              f"{statistics.median(r['wall_us_per_file'] for r in results[1:]):.1f} us/file "
              "wall (round 0 warms up)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

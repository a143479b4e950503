"""``python -m bench.core_smallfiles``: the cache core's CPU time per new small file.

What ``cp -r`` asks of the core for each file, without FUSE: a negative lookup, a create, a
getattr of the directory and a release, 100 files per directory. Timed with the thread's
CPU clock (``time.thread_time``), so other processes on a loaded machine move it little;
creating the spare data files (a background thread in the daemon) is not counted. Prints
microseconds per file for a warm-up round and a measured round.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from cistern.cachenode.core import ROOT_INO, CacheCore
from cistern.cachenode.store import LocalDirStore


def cpu_us_per_file(core: CacheCore, tag: str, files: int) -> float:
    dirs = [core.mkdir(ROOT_INO, f"{tag}{i}", 0o755, 0, 0).ino
            for i in range((files + 99) // 100)]
    core.make_spares()
    spent = 0.0
    for i in range(files):
        parent = dirs[i // 100]
        if i % 32 == 0:  # the daemon's spares thread, outside the measurement
            core.make_spares()
        start = time.thread_time()
        core.find(parent, f"f{i}")
        handle, _ = core.create(parent, f"f{i}", 0o644, os.O_WRONLY, 0, 0)
        core.getattr(parent)
        core.release(handle)
        spent += time.thread_time() - start
    return spent / files * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.core_smallfiles")
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--workdir", help="where the cache lives (default: a temp dir)")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="cistern-core-", dir=args.workdir))
    core = CacheCore(root / "cache", LocalDirStore(root / "objects"))
    try:
        print(f"warm-up: {cpu_us_per_file(core, 'w', args.files):.1f} us CPU per file")
        print(f"measured: {cpu_us_per_file(core, 'm', args.files):.1f} us CPU per file "
              "(lookup + create + getattr + release)")
    finally:
        core.close()
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

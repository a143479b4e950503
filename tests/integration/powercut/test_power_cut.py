"""Power cuts at random moments of a running workload, each recovered by a fresh node.

The cache directory is on ext4 over a loop device whose image lives on XFS; a cut freezes
the node (SIGSTOP: it sends nothing more), clones the device image (``cp --reflink``: what
the device holds, without the page cache) and copies the bucket, then lets the node go on.
After the workload, each crash state is mounted (ext4 replays its journal), a new
``cistern-node`` recovers it against that cut's bucket, and the verdict is:
  - every file whose fsync returned before the cut reads back intact and reaches the store
    with that content;
  - no object goes back to an older version or to content that was never written;
  - no multipart upload is left open;
  - no recovered node reports a conflict (there is no other writer).
See tests/support/powercut/ for why this is a faithful crash state.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from support.powercut.blockdev import CacheDevice, missing_capability
from support.powercut.cut import Cut, live_node, power_cut
from support.powercut.verdict import CutFigures, judge_bucket, judge_local
from support.powercut.workload import Mark, read_ledger
from support.wait import wait_until

TESTS = Path(__file__).resolve().parents[2]
PART = 5 << 20
FLUSH = {"partSize": "5Mi", "multipartThreshold": "6Mi", "maxConcurrentUploads": 4}
CUTS = int(os.environ.get("CISTERN_POWERCUT_CUTS", "50"))

_reason = missing_capability()
pytestmark = pytest.mark.skipif(_reason is not None, reason=f"power-cut harness: {_reason}")


class _Writer:
    """The workload process (tests/support/powercut/workload.py) and its ledger."""

    def __init__(self, root: Path, log: Path, seed: int) -> None:
        self.log = log
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(TESTS), *filter(None, [os.environ.get("PYTHONPATH")])]))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "support.powercut.workload", "--root", str(root),
             "--log", str(log), "--seed", str(seed), "--part-size", str(PART),
             "--big-size", str(7 << 20)], env=env, stderr=subprocess.PIPE)

    def ops(self) -> int:
        return read_ledger(self.log, PART).ops

    def wait_ops(self, count: int, timeout: float) -> None:
        """Wait until ``count`` more operations have completed (the workload must live)."""
        target = self.ops() + count

        def progressed() -> bool:
            if self.proc.poll() is not None:
                stderr = self.proc.stderr.read() if self.proc.stderr else b""
                raise AssertionError(f"the workload died: {stderr!r}")
            return self.ops() >= target

        wait_until(progressed, timeout, what=f"{count} more workload operations",
                   interval=0.02)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)


def test_power_cuts_lose_no_fsynced_file_and_never_regress_an_object(
        tmp_path: Path, device: CacheDevice, moto: Any, s3: Any, bucket: str) -> None:
    seed = int(os.environ.get("CISTERN_POWERCUT_SEED", str(random.randrange(1 << 30))))
    print(f"\npower-cut seed: {seed} (CISTERN_POWERCUT_SEED to replay)")
    rng = random.Random(seed)
    figures = CutFigures()
    cuts: list[tuple[Mark, Cut]] = []
    with live_node(device, tmp_path, bucket, moto.endpoint, 0.1, {"flush": FLUSH}) as node:
        writer = _Writer(node.mount, tmp_path / "ledger.jsonl", seed)
        try:
            for index in range(CUTS):
                writer.wait_ops(rng.randint(1, 4), timeout=60)
                marks: list[Mark] = []

                def take_mark(marks: list[Mark] = marks) -> None:
                    marks.append(read_ledger(writer.log, PART).mark())

                cut = power_cut(node, device, s3, bucket, f"cut{index}", also=writer.proc,
                                on_frozen=take_mark)
                cuts.append((marks[0], cut))
        finally:
            writer.stop()
    ledger = read_ledger(writer.log, PART)
    final = ledger.mark()
    started = time.monotonic()
    for index, (mark, cut) in enumerate(cuts):
        label = f"cut {index} (after {mark.ops} ops)"
        with cut.recovered(tmp_path / f"r{index}", moto.endpoint, {"flush": FLUSH}) as again:
            judge_local(again.mount, mark, label, figures)
            status = again.flush()
            if status.conflicts_total:
                figures.conflicts.append(f"{label}: {status.last_conflict}")
        judge_bucket(s3, cut.bucket, cut.at_cut, mark, final, ledger.etags, label, figures)
        figures.cuts += 1
        cut.discard(s3)
    print(f"power-cut figures ({ledger.ops} workload ops, recovery "
          f"{time.monotonic() - started:.0f}s): {figures.summary()}")
    problems = (figures.lost + figures.wrong_in_store + figures.regressed + figures.torn
                + figures.open_uploads + figures.conflicts)
    assert figures.checked > figures.cuts, "the cuts checked almost no fsync'd file"
    assert not problems, "\n".join(problems[:40])

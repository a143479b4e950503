"""The ``dlio`` phase: MLPerf Storage v2.0's checkpointing workload (Llama 3 8B shapes, scaled
down; ``bench.dlio_io``) against every selected target, repetitions interleaved.

Per target and repetition: a fresh mount and bucket; ``--dlio-writes`` checkpoints written by
``--dlio-ranks`` rank processes (each fsyncs its files), the files dropped from the page cache,
then ``--dlio-reads`` checkpoints read back. Figures: write and read GiB/s (bytes of all
checkpoints over the summed time of the slowest rank per checkpoint, as DLIO reports them)
and the time from the first checkpoint's start until every checkpoint written is in the
bucket (the targets' usual durability check: objects listed with their sizes).
"""

from __future__ import annotations

import logging
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench import workloads
from bench.childproc import EventChild
from bench.s3env import S3Env
from bench.targets import Mounted, Target

if TYPE_CHECKING:
    from bench.runner import BenchConfig, BenchRun, TargetRun

logger = logging.getLogger(__name__)

GiB = 1 << 30
FOLDER = "checkpoints/llama3_8b"  # the official config's checkpoint_folder, shortened


def unavailable_reason() -> str | None:
    try:
        import torch  # noqa: F401
    except ImportError as exc:
        return f"{exc.name} is not installed (pip install -e .[test])"
    return None


def _drop_cached(mounted: Mounted, directory: Path) -> None:
    """Evict the checkpoint files from the page cache before they are read back, as the
    official run requires (its read phase must not be served from client memory): the
    files themselves and, for a cache node, its local data files."""
    workloads.drop_page_cache(directory)
    cache = mounted.workdir / "cache" / "data"
    if cache.is_dir():
        workloads.drop_page_cache(cache)


def _run_once(cfg: BenchConfig, env: S3Env, mounted: Mounted, run: TargetRun) -> None:
    directory = mounted.path / FOLDER
    cmd = [sys.executable, "-m", "bench.dlio_io", "--dir", str(directory),
           "--ranks", str(cfg.dlio_ranks), "--scale", str(cfg.dlio_scale),
           "--writes", str(cfg.dlio_writes), "--reads", str(cfg.dlio_reads)]
    written: list[dict[str, Any]] = []
    read: list[dict[str, Any]] = []
    with EventChild(cmd, "DLIO-shaped workload") as child:
        events = child.events()
        if next(events)["event"] != "ready":
            raise RuntimeError("the DLIO-shaped workload did not start")
        env.wait_quiet(settle=cfg.quiet_settle)
        for event in events:
            if event["event"] == "written":
                written.append(event)
            elif event["event"] == "writes_done":
                _drop_cached(mounted, directory)
                child.send("go")
            elif event["event"] == "read":
                read.append(event)
        child.finish(cfg.step_timeout)
    if len(written) != cfg.dlio_writes or len(read) != cfg.dlio_reads:
        raise child.failure(f"{len(written)} writes, {len(read)} reads")
    run.metrics["dlio_write_gib_s"] = (sum(e["bytes"] for e in written) / GiB
                                       / sum(e["seconds"] for e in written))
    run.metrics["dlio_read_gib_s"] = (sum(e["bytes"] for e in read) / GiB
                                      / sum(e["seconds"] for e in read))
    files = {f"{FOLDER}/{rel}": size for e in written for rel, size in e["files"].items()}
    if mounted.target.kind == "local":  # no object store: durable once the last fsync returned
        durable: float | None = (written[-1]["wall_start"] + written[-1]["seconds"]
                                 - written[0]["wall_start"])
        note = ""
    else:
        durable, note = workloads.wait_durable(env, mounted, files, written[0]["wall_start"],
                                               cfg.durable_timeout)
    run.metrics["dlio_durable_s"] = durable
    if note:
        run.notes.append(f"dlio: {note}")


def dlio_phase(cfg: BenchConfig, env: S3Env, targets: list[Target], root: Path,
               result: BenchRun) -> None:
    from bench.runner import TargetRun

    reason = unavailable_reason()
    if reason is not None:
        logger.warning("dlio workload skipped: %s", reason)
        return
    phase_dir = root / "dlio"
    phase_dir.mkdir()
    try:
        for rep in range(cfg.reps):
            for target in targets:
                runs = result.runs[target.name]
                while len(runs) <= rep:
                    runs.append(TargetRun())
                run = runs[rep]
                logger.info("rep %d/%d: %s: MLPerf-shaped checkpointing (%d ranks, 1/%g of "
                            "Llama 3 8B, %d writes, %d reads)", rep + 1, cfg.reps,
                            target.name, cfg.dlio_ranks, cfg.dlio_scale, cfg.dlio_writes,
                            cfg.dlio_reads)
                _target_once(cfg, env, target, rep, phase_dir, run)
    finally:
        shutil.rmtree(phase_dir, ignore_errors=True)


def _target_once(cfg: BenchConfig, env: S3Env, target: Target, rep: int, phase_dir: Path,
                 run: TargetRun) -> None:
    from bench.runner import fresh_mount

    workdir = phase_dir / f"{target.name}-r{rep}"
    try:
        with fresh_mount(env, target, f"bench-dlio-{target.name}-r{rep}".lower(), workdir,
                         run, "dlio") as mounted:
            t = time.monotonic()
            _run_once(cfg, env, mounted, run)
            run.step("dlio", t)
    except Exception as exc:  # noqa: BLE001 - reported with the figures, the batch goes on
        logger.error("%s rep %d: dlio failed: %s", target.name, rep, exc)
        logger.debug("%s", traceback.format_exc())
        run.notes.append(f"dlio failed: {str(exc)[-300:]}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)  # hundreds of MiB per target and round

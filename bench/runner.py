"""Runs every workload on every target, repetition by repetition, and collects the figures."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench import dlio_bench, s3api_bench, workloads
from bench.s3env import S3Env
from bench.targets import Mounted, Target, build_targets

logger = logging.getLogger(__name__)

GiB = 1 << 30
MiB = 1 << 20

#: fio: bandwidth and latency; checkpoints: DCP and torch.save saves, then cold loads after a
#: remount; smallfiles: cp -r of many small files (a phase of its own, see _small_files_phase);
#: s3api: an S3Checkpoint save straight to S3 vs through a node's S3 endpoint (bench.s3api_bench);
#: dlio: MLPerf Storage v2.0 checkpointing, Llama 3 8B shapes scaled down (bench.dlio_bench).
WORKLOADS = ("fio", "checkpoints", "smallfiles", "s3api", "dlio")
DEFAULT_WORKLOADS = ("fio", "checkpoints", "smallfiles", "s3api")
"""What runs without ``--workloads``: dlio only when asked (``make bench-dlio``)."""


@dataclass
class BenchConfig:
    """Everything a run depends on; recorded in the JSON output."""

    profile: str = "default"
    targets: list[str] = field(
        default_factory=lambda: ["raw", "cistern", "juicefs", "rclone", "s3fs"])
    """raw, cistern, juicefs, rclone, s3fs (cistern expands to one target per front end)."""
    frontends: list[str] = field(default_factory=lambda: ["pyfuse3", "passthrough", "splice"])
    """Cistern FUSE front ends to measure (``--fuse-frontend``)."""
    workloads: list[str] = field(default_factory=lambda: list(DEFAULT_WORKLOADS))
    """Which of ``WORKLOADS`` to run."""
    reps: int = 3
    fio_size: int = 512 * MiB
    """Bytes written by each fio run (split across jobs)."""
    fio_jobs: list[int] = field(default_factory=lambda: [1, 4])
    model_size: int = 256 * MiB
    """Bytes of tensors in each checkpoint."""
    tensors: int = 16
    small_files: int = 2_000
    small_file_size: int = 4096
    small_files_skip: dict[str, str] = field(default_factory=lambda: {
        "s3fs": "write-through: one synchronous PUT (+HEADs) per file at 35 ms each "
                "would take longer than the whole benchmark",
    })
    small_files_timeout: float = 180.0
    s3api_size: int = 1 * GiB
    """Bytes of tensors in the S3Checkpoint save of the s3api workload."""
    dlio_ranks: int = 8
    """dlio: rank processes (the MLPerf Llama 3 8B run uses 8)."""
    dlio_scale: float = 400.0
    """dlio: the Llama 3 8B checkpoint's bytes (~105 GiB) divided by this (~268 MiB)."""
    dlio_writes: int = 3
    """dlio: checkpoints written (the official run: 10)."""
    dlio_reads: int = 3
    """dlio: checkpoints read back (the official run: 10)."""
    latency_ms: float = 35.0
    error_rate: float = 0.0
    upload_delay: float = 1.0
    """Cistern's --upload-delay (seconds a closed file waits before upload)."""
    cistern_config: str | None = None
    """A YAML node config file for the Cistern targets (``cistern-node run --config``)."""
    quiet_settle: float = 1.5
    """Seconds without S3 requests that count as quiet (between and after saves)."""
    durable_timeout: float = 600.0
    step_timeout: float = 900.0
    workdir: str | None = None
    """Where mounts and caches live (default: a temp dir on the same disk as the raw dir)."""


# The default profile above fits in 20 minutes on 2 cores, where moto (~40 MB/s through
# Python) bounds every byte that goes to S3. FULL has the sizes (about an hour there).
FULL = dict(profile="full", fio_size=2 * GiB, model_size=1 * GiB, small_files=10_000,
            small_files_timeout=600.0)
SMOKE = dict(profile="smoke", targets=["raw", "cistern"], reps=1, fio_size=16 * MiB,
             model_size=8 * MiB, tensors=4, small_files=200, small_files_timeout=60.0,
             s3api_size=8 * MiB, dlio_ranks=2, dlio_scale=20_000.0, dlio_writes=2,
             dlio_reads=2,
             quiet_settle=0.4, durable_timeout=60.0, step_timeout=120.0)


@dataclass
class TargetRun:
    """Per-repetition figures of one target (``None`` where not applicable)."""

    metrics: dict[str, float | None] = field(default_factory=dict)
    requests: dict[str, dict[str, int]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    steps: dict[str, float] = field(default_factory=dict)
    """Harness wall time per step (mount, fio, saves, remount, ...), for finding slow steps."""

    def step(self, name: str, since: float) -> float:
        now = time.monotonic()
        self.steps[name] = round(now - since, 3)
        return now


@dataclass
class BenchRun:
    config: BenchConfig
    targets: dict[str, dict[str, Any]] = field(default_factory=dict)
    runs: dict[str, list[TargetRun]] = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    finished: float = 0.0


def _run_target(cfg: BenchConfig, env: S3Env, target: Target, rep: int, root: Path) -> TargetRun:
    run = TargetRun()
    bucket = f"bench-{target.name}-r{rep}".lower()
    workdir = root / f"{target.name}-r{rep}"
    workdir.mkdir(parents=True)
    env.create_bucket(bucket)
    mounted: Mounted | None = None
    t = time.monotonic()
    try:
        mounted = target.mount(env, bucket, workdir)
        t = run.step("mount", t)
        for jobs in cfg.fio_jobs if "fio" in cfg.workloads else ():
            fio_dir = mounted.path / f"fio-{jobs}j"
            result = workloads.run_fio(fio_dir, cfg.fio_size, jobs,
                                       workdir / f"fio-{jobs}j.json", cfg.step_timeout)
            for name, value in asdict(result).items():
                run.metrics[f"fio{jobs}j_{name}"] = value
            workloads.remove_tree(fio_dir)
            t = run.step(f"fio{jobs}j", t)
        if "checkpoints" not in cfg.workloads:
            return run
        saves = workloads.checkpoint_saves(env, mounted, ["dcp", "torchsave"], cfg.model_size,
                                           cfg.tensors, cfg.durable_timeout, cfg.quiet_settle)
        for kind, saved in saves.items():
            run.metrics[f"{kind}_stall_s"] = saved.stall_s
            run.metrics[f"{kind}_durable_s"] = saved.durable_s
            run.metrics[f"{kind}_read_after_write_s"] = saved.read_after_write_s
            run.metrics[f"{kind}_acked_s"] = saved.acked_s
            run.metrics[f"{kind}_completed_s"] = saved.completed_s
            run.metrics[f"{kind}_nodecpu_s"] = saved.node_cpu_s
            run.metrics[f"{kind}_storecpu_s"] = saved.store_cpu_s
            run.requests[kind] = saved.requests
            if saved.note:
                run.notes.append(f"{kind}: {saved.note}")
        t = run.step("checkpoint_saves", t)
        loader = workloads.ColdLoader(["dcp", "torchsave"], cfg.model_size, cfg.tensors)
        try:
            target.unmount(mounted)
            mounted = None
            t = run.step("unmount", t)
            mounted = target.mount(env, bucket, workdir, cold=True)
            t = run.step("cold_mount", t)
            cold = loader.load(mounted, cfg.step_timeout)
            t = run.step("cold_loads", t)
        finally:
            loader.close()
        for kind, seconds in cold.items():
            run.metrics[f"{kind}_cold_read_s"] = seconds
    except Exception as exc:  # noqa: BLE001 - a failing target is reported, the batch goes on
        logger.error("%s rep %d failed: %s", target.name, rep, exc)
        logger.debug("%s", traceback.format_exc())
        run.error = str(exc)[-1000:]
    finally:
        _unmount_quietly(target, mounted)
        t = run.step("final_unmount", t)
        env.delete_bucket(bucket)
        shutil.rmtree(workdir, ignore_errors=True)
        run.step("cleanup", t)
    return run


def run_bench(cfg: BenchConfig) -> BenchRun:
    result = BenchRun(config=cfg)
    targets = build_targets(cfg.targets, cfg.frontends, cfg.upload_delay, cfg.cistern_config)
    available: list[Target] = []
    for target in targets:
        reason = target.unavailable_reason()
        result.targets[target.name] = {
            "available": reason is None, "reason": reason,
            "version": target.version() if reason is None else "",
            "description": target.describe(),
        }
        if reason is None:
            available.append(target)
        else:
            logger.warning("target %s unavailable: %s", target.name, reason)
        result.runs[target.name] = []
    parent = Path(cfg.workdir) if cfg.workdir else None
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="cistern-bench-", dir=parent))
    try:
        small_src = root / "small-src"
        workloads.make_small_files(small_src, cfg.small_files, cfg.small_file_size)
        with S3Env(cfg.latency_ms / 1000.0, cfg.error_rate) as env:
            main_phase = bool({"fio", "checkpoints"} & set(cfg.workloads))
            for rep in range(cfg.reps):
                for target in available:
                    if not main_phase and "smallfiles" not in cfg.workloads:
                        continue
                    if not main_phase:  # the small-files phase fills in this repetition
                        result.runs[target.name].append(TargetRun())
                        continue
                    logger.info("rep %d/%d: %s", rep + 1, cfg.reps, target.name)
                    started = time.monotonic()
                    run = _run_target(cfg, env, target, rep, root)
                    result.runs[target.name].append(run)
                    logger.info("rep %d/%d: %s done in %.1fs%s", rep + 1, cfg.reps,
                                target.name, time.monotonic() - started,
                                f" (error: {run.error})" if run.error else "")
                    if run.error and _rejected_frontend(target, run.error):
                        result.targets[target.name].update(
                            available=False, reason=f"cistern-node rejected it: {run.error}")
                        available = [t for t in available if t is not target]
            if "smallfiles" in cfg.workloads:
                _small_files_phase(cfg, env, available, root, small_src, result)
            if "dlio" in cfg.workloads:
                dlio_bench.dlio_phase(cfg, env, available, root, result)
            if "s3api" in cfg.workloads:
                s3api_bench.s3api_phase(cfg, env, root, result)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result.finished = time.time()
    return result


def _small_files_phase(cfg: BenchConfig, env: S3Env, targets: list[Target], root: Path,
                       small_src: Path, result: BenchRun) -> None:
    """``cp -r`` of the small files into every target, repetitions interleaved.

    A phase of its own so that every copy starts from the same disk state: a fresh mount
    and bucket, no dirty pages left by an earlier step (sync first), and no deletions in
    between. The copies are deleted only after the phase. That matters on ext4 without a
    journal (as on the benchmark machine): for about a minute after many files are deleted,
    every create in their block group scans past the recently deleted inodes, which made
    whichever target came right after a cleanup look several times slower.
    """
    phase_dir = root / "smallfiles"
    phase_dir.mkdir()
    try:
        # An untimed warm-up copy into a plain directory: first-touch costs (the source
        # tree's metadata, the block groups the phase's files land in) count for no target.
        os.sync()
        workloads.copy_small_files(small_src, phase_dir / "warm-up", cfg.small_files_timeout)
        for rep in range(cfg.reps):
            for target in targets:
                run = result.runs[target.name][rep]
                skip = cfg.small_files_skip.get(target.name.split("-")[0])
                if skip:
                    run.metrics["smallfiles_cp_s"] = None
                    run.notes.append(f"cp -r small files skipped: {skip}")
                    continue
                logger.info("rep %d/%d: %s: cp -r of %d files", rep + 1, cfg.reps,
                            target.name, cfg.small_files)
                _copy_small_files(cfg, env, target, rep, phase_dir, small_src, run)
    finally:
        workloads.remove_tree(phase_dir)


@contextmanager
def fresh_mount(env: S3Env, target: Target, bucket: str, workdir: Path, run: TargetRun,
                phase: str) -> Iterator[Mounted]:
    """A phase's mount of ``target``: a new bucket and work directory, unmounted and the
    bucket deleted afterwards whatever happens (steps ``<phase>_mount``/``_unmount``)."""
    workdir.mkdir()
    env.create_bucket(bucket)
    mounted: Mounted | None = None
    t = time.monotonic()
    try:
        mounted = target.mount(env, bucket, workdir)
        t = run.step(f"{phase}_mount", t)
        yield mounted
    finally:
        _unmount_quietly(target, mounted)
        env.delete_bucket(bucket)
        run.step(f"{phase}_unmount", t)


def _copy_small_files(cfg: BenchConfig, env: S3Env, target: Target, rep: int, phase_dir: Path,
                      small_src: Path, run: TargetRun) -> None:
    # No rm -rf through the mount (for rclone that is one DELETE per file at 35 ms): the
    # copies stay on disk until the phase ends, the bucket goes at once.
    try:
        with fresh_mount(env, target, f"bench-sf-{target.name}-r{rep}".lower(),
                         phase_dir / f"{target.name}-r{rep}", run, "smallfiles") as mounted:
            os.sync()
            t = time.monotonic()
            cp_seconds, note = workloads.copy_small_files(small_src, mounted.path / "small",
                                                          cfg.small_files_timeout)
            run.metrics["smallfiles_cp_s"] = cp_seconds
            if note:
                run.notes.append(note)
            run.step("smallfiles_cp", t)
    except Exception as exc:  # noqa: BLE001 - reported with the figures, the batch goes on
        logger.error("%s rep %d: small files failed: %s", target.name, rep, exc)
        run.metrics["smallfiles_cp_s"] = None
        run.notes.append(f"cp -r small files failed: {str(exc)[-300:]}")


def _unmount_quietly(target: Target, mounted: Mounted | None) -> None:
    """Unmount at the end of a step; a failure is logged, the batch goes on."""
    if mounted is None:
        return
    try:
        target.unmount(mounted)
    except Exception as exc:  # noqa: BLE001
        logger.warning("%s: unmount failed: %s", target.name, exc)


def _rejected_frontend(target: Target, error: str) -> bool:
    """A Cistern front end that fails to mount at all (e.g. no kernel support) is skipped
    for the remaining repetitions and reported with cistern-node's own message."""
    return target.name.startswith("cistern-") and "exited with" in error

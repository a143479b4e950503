"""The MLPerf Storage v2.0 checkpointing workload (Llama 3 8B shapes), scaled down, run as a
child process by the harness (``bench.dlio_bench``). Not DLIO itself: see docs/benchmarks.md,
"MLPerf-shaped checkpointing (DLIO)" for why and for every difference from the official run.

``python -m bench.dlio_io --dir D --ranks 8 --scale 400 --writes 3 --reads 3`` starts one
process per rank (as ``mpirun -n 8`` starts DLIO's ranks). Each rank holds its ZeRO-3 shard
of the model (fp16) and of the optimizer state (fp32 master weights, Adam's two moments) as
int8 tensors of the right byte sizes, like DLIO's PyTorch checkpointing. A checkpoint: every
rank ``torch.save``s its two files into ``global_step<N>/`` and fsyncs them (the official
config sets ``fsync: True``); it is done when the slowest rank is. Then, after the harness
has dropped the files from the page cache (it prints ``{"event": "written"}`` and waits for a
line on stdin), every rank ``torch.load``s its files of each checkpoint back.

Output, one JSON line per event: ``ready``, ``written`` (per checkpoint: seconds, bytes, its
files and the wall time it started), ``read`` (per checkpoint: seconds, bytes).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from dataclasses import dataclass
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Llama3:
    """The transformer shapes of MLPerf Storage's ``llama3_8b.yaml`` (DLIO ``model:``)."""

    num_layers: int = 32
    hidden_size: int = 4096
    ffn_hidden_size: int = 14336
    vocab_size: int = 128256
    num_attention_heads: int = 32
    num_kv_heads: int = 8

    def parameters(self) -> int:
        h, kv = self.hidden_size, self.hidden_size * self.num_kv_heads // self.num_attention_heads
        attention = 2 * h * h + 2 * h * kv  # q, o; k, v (grouped-query attention)
        mlp = 3 * h * self.ffn_hidden_size  # gate, up, down
        norms = 2 * h
        return self.num_layers * (attention + mlp + norms) + 2 * self.vocab_size * h + h


MODEL_BYTES_PER_PARAM = 2  # model_datatype: fp16
OPTIMIZER_BYTES_PER_PARAM = 12  # optimizer_datatype: fp32 master weights + Adam m and v


def shard_bytes(ranks: int, scale: float) -> tuple[int, int]:
    """Bytes of one rank's model and optimizer files (ZeRO-3: everything sharded by rank)."""
    params = Llama3().parameters()
    model = int(params * MODEL_BYTES_PER_PARAM / ranks / scale)
    optimizer = int(params * OPTIMIZER_BYTES_PER_PARAM / ranks / scale)
    return model, optimizer


def _names(rank: int) -> tuple[str, str]:
    # DeepSpeed's ZeRO-3 layout: one model-state and one optimizer-state file per rank.
    return (f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt",
            f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")


def _save(path: Path, state: dict[str, Any]) -> None:
    import torch

    with open(path, "wb") as handle:
        torch.save(state, handle)
        handle.flush()
        os.fsync(handle.fileno())


def _rank(rank: int, args: argparse.Namespace, barrier: Barrier, out: Any) -> None:
    import torch

    model_bytes, optim_bytes = shard_bytes(args.ranks, args.scale)
    generator = torch.Generator().manual_seed(rank)

    def tensor(n: int) -> Any:
        return torch.randint(-128, 127, (n,), dtype=torch.int8, generator=generator)

    # Optimizer state as DLIO builds it: per group two moments, plus the fp32 master copy.
    third = optim_bytes // 3
    model = {"module": tensor(model_bytes)}
    optimizer = {"exp_avg": tensor(third), "exp_avg_sq": tensor(third),
                 "fp32_master": tensor(optim_bytes - 2 * third)}
    model_name, optim_name = _names(rank)
    root = Path(args.dir)
    barrier.wait()
    for step in range(args.writes):
        directory = root / f"global_step{step + 1}"
        directory.mkdir(parents=True, exist_ok=True)
        barrier.wait()
        start = time.time()
        _save(directory / model_name, model)
        _save(directory / optim_name, optimizer)
        out.put(("written", step, rank, start, time.time()))
        barrier.wait()
    barrier.wait()  # the parent drops the page cache in between
    for step in range(args.reads):
        directory = root / f"global_step{step % args.writes + 1}"
        barrier.wait()
        start = time.time()
        for name in (model_name, optim_name):
            torch.load(directory / name, weights_only=True)
        out.put(("read", step, rank, start, time.time()))
        barrier.wait()


def _files(directory: Path) -> dict[str, int]:
    return {str(p.relative_to(directory.parent)): p.stat().st_size
            for p in sorted(directory.iterdir()) if p.is_file()}


def _emit(event: dict[str, Any]) -> None:
    print(json.dumps(event), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.dlio_io")
    parser.add_argument("--dir", required=True, help="checkpoint folder")
    parser.add_argument("--ranks", type=int, default=8)
    parser.add_argument("--scale", type=float, default=400.0,
                        help="divide the Llama 3 8B checkpoint's bytes by this")
    parser.add_argument("--writes", type=int, default=3, help="checkpoints written")
    parser.add_argument("--reads", type=int, default=3, help="checkpoints read back")
    args = parser.parse_args(argv)
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(args.ranks + 1)
    out = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, args, barrier, out), daemon=True)
             for r in range(args.ranks)]
    for proc in procs:
        proc.start()
    try:
        barrier.wait(timeout=600)  # every rank built its state
        _emit({"event": "ready"})
        root = Path(args.dir)
        for phase, count in (("written", args.writes), ("read", args.reads)):
            if phase == "read":
                _emit({"event": "writes_done"})
                sys.stdin.readline()  # the harness drops the page cache
                barrier.wait(timeout=600)
            for step in range(count):
                barrier.wait(timeout=600)
                spans = [out.get(timeout=3600)[3:] for _ in range(args.ranks)]
                barrier.wait(timeout=3600)
                start, end = min(s for s, _ in spans), max(e for _, e in spans)
                directory = root / f"global_step{step % args.writes + 1}"
                files = _files(directory)
                event = {"event": phase, "step": step, "seconds": end - start,
                         "bytes": sum(files.values()), "wall_start": start}
                if phase == "written":
                    event["files"] = files
                _emit(event)
    finally:
        for proc in procs:
            proc.join(timeout=60)
            if proc.is_alive():
                proc.kill()
    return 0 if all(p.exitcode == 0 for p in procs) else 1


if __name__ == "__main__":
    sys.exit(main())

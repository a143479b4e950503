"""Checkpoint writer/reader run as a child process by the harness (one Python per save).

``python -m bench.checkpoint_io save --kind dcp,torchsave --dir D1 --dir D2 --size-bytes N``
builds a deterministic model state (``--tensors`` float32 tensors totalling N bytes); for
each kind it saves it (with ``--wait`` only after a line on stdin, so the harness can let
S3 go quiet first without paying torch's import again), prints ``{"event": "saved", ...}``
(stall seconds and the files written), then loads it right back (read-after-write) and
prints ``{"event": "loaded", ...}``. ``... load ...`` only loads (cold restart) and
verifies the content.

Kinds:
* ``dcp``: ``torch.distributed.checkpoint.save`` with ``FileSystemWriter`` (several
  ``.distcp`` files written by 4 threads, then ``.metadata``, fsynced).
* ``torchsave``: ``torch.save`` to ``model.pt.tmp``, fsync, rename to ``model.pt``, fsync
  of the directory (the careful single-file pattern).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

DCP_THREADS = 4


def build_state(size_bytes: int, tensors: int, empty: bool = False) -> dict[str, Any]:
    import torch

    per = max(1, size_bytes // tensors // 4)
    cols = 1024 if per >= 1024 else per
    rows = max(1, per // cols)
    generator = torch.Generator().manual_seed(1234)
    state: dict[str, Any] = {}
    for i in range(tensors):
        if empty:
            state[f"layer{i:03d}.weight"] = torch.empty(rows, cols)
        else:
            state[f"layer{i:03d}.weight"] = torch.rand(rows, cols, generator=generator)
    return state


def _files(directory: Path) -> dict[str, int]:
    return {str(p.relative_to(directory)): p.stat().st_size
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(kind: str, directory: Path, state: dict[str, Any]) -> float:
    import torch

    directory.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if kind == "dcp":
        import torch.distributed.checkpoint as dcp

        writer = dcp.FileSystemWriter(str(directory), single_file_per_rank=True,
                                      sync_files=True, thread_count=DCP_THREADS)
        dcp.save(state, storage_writer=writer)
    else:
        tmp = directory / "model.pt.tmp"
        with open(tmp, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, directory / "model.pt")
        _fsync_dir(directory)
    return time.perf_counter() - start


def load(kind: str, directory: Path, template: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    import torch

    start = time.perf_counter()
    if kind == "dcp":
        import torch.distributed.checkpoint as dcp

        dcp.load(template, storage_reader=dcp.FileSystemReader(str(directory)))
        loaded = template
    else:
        loaded = torch.load(directory / "model.pt", weights_only=True)
    return time.perf_counter() - start, loaded


def _equal(a: dict[str, Any], b: dict[str, Any]) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _emit(event: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("action", choices=("save", "load"))
    parser.add_argument("--kind", required=True,
                        help="dcp or torchsave; load takes a comma list (one --dir each)")
    parser.add_argument("--dir", type=Path, action="append", default=[],
                        help="checkpoint directory per kind (load --wait: given on stdin)")
    parser.add_argument("--size-bytes", type=int, required=True)
    parser.add_argument("--tensors", type=int, default=16)
    parser.add_argument("--wait", action="store_true",
                        help="print a ready event and wait for a line on stdin (save: before each "
                        "save; load: a JSON {\"dirs\": [...]} line before loading)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(1)
    kinds = args.kind.split(",")
    state = build_state(args.size_bytes, args.tensors)
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    if args.action == "load" and args.wait:
        _emit({"event": "ready"})
        line = sys.stdin.readline()
        if not line:
            sys.exit("stdin closed before the go line")
        args.dir = [Path(d) for d in json.loads(line)["dirs"]]
    if len(kinds) != len(args.dir) or not set(kinds) <= {"dcp", "torchsave"}:
        parser.error("give one --dir per kind; kinds are dcp and torchsave")
    for kind, directory in zip(kinds, args.dir, strict=True):
        if args.action == "save":
            _emit({"event": "ready", "kind": kind})
            if args.wait and not sys.stdin.readline():
                sys.exit("stdin closed before the go line")
            stall = save(kind, directory, state)
            _emit({"event": "saved", "kind": kind, "stall_s": stall, "bytes": nbytes,
                   "wall_end": time.time(), "files": _files(directory)})
        template = build_state(args.size_bytes, args.tensors, empty=True)
        read_s, loaded = load(kind, directory, template)
        ok = _equal(state, loaded)
        _emit({"event": "loaded", "kind": kind, "read_s": read_s, "bytes": nbytes,
               "verified": ok})
        if not ok:
            sys.exit(f"loaded {kind} checkpoint in {directory} differs from the saved one")

if __name__ == "__main__":
    main()

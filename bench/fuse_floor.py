"""``python -m bench.fuse_floor``: what a FUSE round trip costs on this machine.

``cp -r`` of small files into any FUSE mount costs at least three synchronous round trips
per file (a negative LOOKUP, CREATE, and a GETATTR of the directory, which the kernel
refreshes after every change in it because of ``default_permissions``), plus an
asynchronous RELEASE. This measures, in one batch:

* the LOOKUP round trip of a minimal single-threaded libfuse3 server in C
  (``bench/floor/rt.c``, compiled here with gcc and pkg-config fuse3),
* the same round trip through a ``cistern-node`` passthrough mount,
* ``cp -r`` of the small files into a plain directory and into the Cistern mount (3 rounds
  each, interleaved, medians),

and prints the floor they imply for ``cp -r`` through FUSE on this machine:
``3 x (the faster round trip) + (raw cp -r per file)``. Writes a JSON file with ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench import workloads
from bench.targets import is_mounted
from tests.support.s3server import free_port

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "floor" / "rt.c"


class FloorError(RuntimeError):
    """The measurement cannot run here; the message says why."""


def build_server(workdir: Path) -> Path:
    """Compile the C server; FloorError if gcc or libfuse3-dev is missing."""
    for tool in ("gcc", "pkg-config"):
        if shutil.which(tool) is None:
            raise FloorError(f"{tool} is not installed (apt-get install gcc pkg-config)")
    flags = subprocess.run(["pkg-config", "--cflags", "--libs", "fuse3"], capture_output=True,
                           text=True)
    if flags.returncode != 0:
        raise FloorError("libfuse3 development files are missing (apt-get install "
                         f"libfuse3-dev): {flags.stderr.strip()}")
    binary = workdir / "fuse-floor"
    build = subprocess.run(["gcc", "-O2", "-Wall", "-o", str(binary), str(SOURCE),
                            *flags.stdout.split()], capture_output=True, text=True)
    if build.returncode != 0:
        raise FloorError(f"compiling {SOURCE.name} failed: {build.stderr.strip()[-500:]}")
    return binary


def _wait_mounted(path: Path, proc: subprocess.Popen[bytes], what: str, log: Path) -> None:
    deadline = time.monotonic() + 30
    while not is_mounted(path):
        if proc.poll() is not None:
            raise FloorError(f"{what} exited with {proc.returncode}: "
                             f"{log.read_text(errors='replace')[-500:]}")
        if time.monotonic() > deadline:
            raise FloorError(f"{what} did not mount {path} in 30 s")
        time.sleep(0.05)


def _stop(path: Path, proc: subprocess.Popen[bytes]) -> None:
    if is_mounted(path):
        subprocess.run(["fusermount3", "-u", str(path)], capture_output=True, timeout=30)
    if proc.poll() is None:
        proc.send_signal(2)  # SIGINT
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if is_mounted(path):
        subprocess.run(["fusermount3", "-u", "-z", str(path)], capture_output=True)


def lookup_round_trip_us(directory: Path, iterations: int) -> float:
    """Median over 3 rounds of the time per stat(2) of a name that does not exist."""
    rounds = []
    for round_ in range(3):
        start = time.perf_counter()
        for i in range(iterations):
            try:  # noqa: SIM105 - cheaper than contextlib.suppress in a timing loop
                os.stat(f"{directory}/missing-{round_}-{i}")
            except FileNotFoundError:
                pass
        rounds.append((time.perf_counter() - start) / iterations * 1e6)
    return statistics.median(rounds)


def measure(files: int, iterations: int, workdir: Path) -> dict[str, float]:
    binary = build_server(workdir)
    src = workdir / "src"
    workloads.make_small_files(src, files, 4096)
    out: dict[str, float] = {}

    # 1. the C server
    mnt = workdir / "c-mnt"
    mnt.mkdir()
    log = workdir / "c.log"
    with open(log, "wb") as sink:
        proc = subprocess.Popen([str(binary), "-f", str(mnt)], stdout=sink,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        _wait_mounted(mnt, proc, "the C FUSE server", log)
        out["c_lookup_rt_us"] = lookup_round_trip_us(mnt, iterations)
    finally:
        _stop(mnt, proc)

    # 2. cistern-node with the passthrough front end over a local object store
    node = workdir / "node"
    mnt = node / "mnt"
    mnt.mkdir(parents=True)
    log = node / "node.log"
    port = free_port()
    cmd = [shutil.which("cistern-node") or "cistern-node", "run", "--mount", str(mnt),
           "--cache-dir", str(node / "cache"), "--store", f"file://{node / 'objects'}",
           "--control", f"127.0.0.1:{port}", "--fuse-frontend", "passthrough",
           "--upload-delay", "3600", "--log-level", "warning"]
    with open(log, "wb") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    try:
        _wait_mounted(mnt, proc, "cistern-node", log)
        _wait_control(port)
        out["cistern_lookup_rt_us"] = lookup_round_trip_us(mnt, iterations)
        # 3. cp -r into a plain directory on the same disk and into the mount, interleaved,
        # each after a sync and into a fresh directory (nothing deleted in between)
        raw, cistern = [], []
        for round_ in range(3):
            raw.append(_copy_us(src, workdir / f"raw-copy-{round_}", files))
            cistern.append(_copy_us(src, mnt / f"copy-{round_}", files))
        out["raw_cp_per_file_us"] = statistics.median(raw)
        out["cistern_cp_per_file_us"] = statistics.median(cistern)
    finally:
        _stop(mnt, proc)
    fastest = min(out["c_lookup_rt_us"], out["cistern_lookup_rt_us"])
    out["floor_cp_per_file_us"] = 3 * fastest + out["raw_cp_per_file_us"]
    out["floor_ratio_to_raw"] = out["floor_cp_per_file_us"] / out["raw_cp_per_file_us"]
    out["cistern_ratio_to_raw"] = out["cistern_cp_per_file_us"] / out["raw_cp_per_file_us"]
    out["cistern_ratio_to_floor"] = out["cistern_cp_per_file_us"] / out["floor_cp_per_file_us"]
    return out


def _copy_us(src: Path, dest: Path, files: int) -> float:
    os.sync()
    seconds, note = workloads.copy_small_files(src, dest, 600)
    if seconds is None:
        raise FloorError(note)
    return seconds / files * 1e6


def _wait_control(port: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=2):
                return
        except OSError:
            time.sleep(0.1)
    raise FloorError("cistern-node's control API did not answer in 30 s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.fuse_floor",
        description="Measure the FUSE round trip of a minimal C server and of Cistern, and "
                    "cp -r of small files into a plain directory and into Cistern; print the "
                    "floor that three round trips per file put under any FUSE file system.")
    parser.add_argument("--files", type=int, default=10_000, help="small files for cp -r")
    parser.add_argument("--iterations", type=int, default=20_000,
                        help="lookups per round (3 rounds, median)")
    parser.add_argument("--workdir", help="where to mount and copy (default: a temp dir)")
    parser.add_argument("--out", help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    parent = Path(args.workdir) if args.workdir else None
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="cistern-floor-", dir=parent))
    try:
        print(f"measuring in {workdir} ({args.files} files, {args.iterations} lookups x 3)",
              flush=True)
        figures = measure(args.files, args.iterations, workdir)
    except FloorError as exc:
        print(f"fuse_floor: {exc}", file=sys.stderr)
        return 2
    finally:
        workloads.remove_tree(workdir)
    print(f"LOOKUP round trip, C libfuse server:    {figures['c_lookup_rt_us']:7.1f} us")
    print(f"LOOKUP round trip, cistern passthrough: {figures['cistern_lookup_rt_us']:7.1f} us")
    print(f"cp -r per file, plain directory:        {figures['raw_cp_per_file_us']:7.1f} us")
    print(f"cp -r per file, cistern passthrough:    {figures['cistern_cp_per_file_us']:7.1f} us"
          f"  ({figures['cistern_ratio_to_raw']:.1f}x raw)")
    print(f"floor for any FUSE file system (3 of the faster round trips + raw): "
          f"{figures['floor_cp_per_file_us']:.1f} us per file "
          f"({figures['floor_ratio_to_raw']:.1f}x raw; cistern is "
          f"{figures['cistern_ratio_to_floor']:.1f}x the floor)")
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The workloads, each run against one mounted target: fio, checkpoint save/load, cp -r."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from bench.childproc import EventChild
from bench.s3env import S3Env, tree_cpu_seconds
from bench.targets import Mounted
from tests.support.faultproxy import LogEntry

logger = logging.getLogger(__name__)

MiB = 1 << 20


@dataclass
class FioResult:
    bw_mib_s: float
    clat_p50_ms: float
    clat_p99_ms: float
    wall_s: float


def run_fio(directory: Path, size: int, jobs: int, out: Path, timeout: float) -> FioResult:
    """fio sequential write, 256 KiB blocks, ``size`` bytes in total over ``jobs`` jobs,
    fsync at the end (included in the bandwidth)."""
    directory.mkdir(parents=True, exist_ok=True)
    per_job = max(256 * 1024, size // jobs // (256 * 1024) * (256 * 1024))
    cmd = ["fio", "--name=seqwrite", f"--directory={directory}", "--rw=write", "--bs=256k",
           f"--size={per_job}", f"--numjobs={jobs}", "--end_fsync=1", "--ioengine=psync",
           "--group_reporting", "--output-format=json", f"--output={out}"]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, timeout=timeout)
    wall = time.perf_counter() - start
    data = json.loads(out.read_text())
    write = data["jobs"][0]["write"]
    pct = write["clat_ns"].get("percentile", {})
    return FioResult(
        bw_mib_s=float(write["bw_bytes"]) / MiB,
        clat_p50_ms=float(pct.get("50.000000", 0.0)) / 1e6,
        clat_p99_ms=float(pct.get("99.000000", 0.0)) / 1e6,
        wall_s=wall,
    )


@dataclass
class SaveResult:
    stall_s: float
    read_after_write_s: float
    durable_s: float | None
    files: dict[str, int]
    requests: dict[str, int]
    note: str = ""
    acked_s: float | None = None
    """Until the store acknowledged the last data request (PART or PUT) before the last
    CompleteMultipartUpload returned: everything but the Complete (and what follows it)."""
    completed_s: float | None = None
    """Until the last CompleteMultipartUpload returned (None: no multipart upload)."""
    node_cpu_s: float | None = None
    """CPU seconds of the target's process tree from the go until S3 was quiet again (None:
    no process of its own, e.g. boto3 uploads from the harness)."""
    store_cpu_s: float | None = None
    """CPU seconds of the moto server over the same span."""


def upload_timeline(log: list[LogEntry], since: float) -> tuple[float | None, float | None]:
    """(last data request acknowledged before the last Complete, last Complete returned),
    seconds from ``since``, from the proxy's log (completion times, wall clock). The gap
    between them is the Complete: our wait before sending it, 35 ms of latency, and the
    server's work (moto concatenates the parts: ``python -m bench.upload_path``)."""
    completes = [e.time for e in log if e.kind == "COMPLETE_MPU" and e.status == 200]
    end = max(completes) if completes else None
    data = [e.time for e in log if e.kind in ("PART", "PUT") and e.status == 200
            and (end is None or e.time <= end)]
    acked = max(data) - since if data else None
    return acked, (end - since if end is not None else None)


def _checkpoint_cmd(action: str, mounted: Mounted, kinds: list[str], size: int,
                    tensors: int) -> list[str]:
    cmd = [sys.executable, "-m", "bench.checkpoint_io", action, "--kind", ",".join(kinds),
           "--size-bytes", str(size), "--tensors", str(tensors)]
    for kind in kinds:
        cmd += ["--dir", str(mounted.path / f"ckpt-{kind}")]
    return cmd


def wait_durable(env: S3Env, mounted: Mounted, files: dict[str, int], since: float,
                 timeout: float) -> tuple[float | None, str]:
    """Seconds from ``since`` (wall clock) until the files are durable in the bucket."""
    target = mounted.target
    if target.kind == "local":
        return None, ""  # a fsynced local save is durable when it returns
    if target.files_as_objects:
        expected = {mounted.prefix + rel: size for rel, size in files.items()}
        result = env.wait_objects(mounted.bucket, expected, since, timeout)
        if result.seconds is None:
            return None, f"not durable after {timeout:.0f}s: {len(result.missing)} missing"
        return result.seconds, ""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if target.is_durable(mounted):
            return time.time() - since, ""
        time.sleep(0.05)
    return None, f"not durable after {timeout:.0f}s"


def checkpoint_saves(env: S3Env, mounted: Mounted, kinds: list[str], size: int, tensors: int,
                     durable_timeout: float, settle: float) -> dict[str, SaveResult]:
    """For each kind: save (stall), load right back (read-after-write), and meanwhile wait
    for durability. One child process does all kinds (torch is imported once); it saves
    only when told to, after S3 has been quiet for ``settle`` seconds. S3 requests are
    counted from the go until the proxy is quiet again after durability."""
    child = EventChild(_checkpoint_cmd("save", mounted, kinds, size, tensors) + ["--wait"],
                       "checkpoint save")
    proc = child.proc
    assert proc.stdin is not None
    results: dict[str, SaveResult] = {}
    with child:
        events = child.events()
        for kind in kinds:
            ready = next(events)
            if ready["event"] != "ready":
                raise RuntimeError(f"unexpected event {ready}")
            env.wait_quiet(settle=settle)
            env.proxy.reset()
            node = mounted.proc.pid if mounted.proc is not None else None
            cpu_before = (tree_cpu_seconds(node) if node is not None else 0.0,
                          tree_cpu_seconds(env.moto_pid))
            proc.stdin.write("go\n")
            proc.stdin.flush()
            saved = next(events)
            since = saved["wall_end"] - saved["stall_s"]
            files = {f"ckpt-{kind}/{rel}": n for rel, n in saved["files"].items()}
            durable: dict[str, tuple[float | None, str]] = {}

            def poll(files: dict[str, int] = files, since: float = since,
                     out: dict[str, tuple[float | None, str]] = durable) -> None:
                out["r"] = wait_durable(env, mounted, files, since, durable_timeout)

            poller = threading.Thread(target=poll, daemon=True)
            poller.start()
            # The boto3 row uploads the saved files itself (other targets: nothing to do).
            uploader = threading.Thread(target=mounted.target.after_save,
                                        args=(env, mounted, files), daemon=True)
            uploader.start()
            loaded = next(events)
            uploader.join()
            poller.join()
            durable_s, note = durable.get("r", (None, "no durability result"))
            # Once quiet: the proxy logs a request after relaying its answer, so a Complete
            # is logged a little after its object shows in the (direct) listing.
            requests = env.wait_quiet(settle=settle)
            acked_s, completed_s = upload_timeline(env.proxy.log(), since)
            node_cpu = tree_cpu_seconds(node) - cpu_before[0] if node is not None else None
            store_cpu = (tree_cpu_seconds(env.moto_pid) - cpu_before[1]
                         if mounted.target.kind != "local" else None)
            results[kind] = SaveResult(
                stall_s=float(saved["stall_s"]), read_after_write_s=float(loaded["read_s"]),
                durable_s=durable_s, files=dict(saved["files"]),
                requests=requests, note=note, acked_s=acked_s, completed_s=completed_s,
                node_cpu_s=node_cpu, store_cpu_s=store_cpu)
        proc.stdin.close()
        proc.wait(timeout=durable_timeout)
    return results


def drop_page_cache(directory: Path) -> None:
    """Evict the files of ``directory`` from the page cache (per file, no global drop)."""
    for path in directory.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


class ColdLoader:
    """A checkpoint-loading child process started ahead (torch imported while the target
    remounts); ``load`` then times only the loads."""

    def __init__(self, kinds: list[str], size: int, tensors: int) -> None:
        self.kinds = kinds
        cmd = [sys.executable, "-m", "bench.checkpoint_io", "load", "--wait",
               "--kind", ",".join(kinds), "--size-bytes", str(size), "--tensors", str(tensors)]
        self._child = EventChild(cmd, "cold load")

    def load(self, mounted: Mounted, timeout: float) -> dict[str, float]:
        dirs = [mounted.path / f"ckpt-{kind}" for kind in self.kinds]
        if mounted.target.kind == "local":
            for directory in dirs:
                drop_page_cache(directory)
        times: dict[str, float] = {}
        with self._child as child:
            events = child.events()
            if next(events)["event"] != "ready":
                raise RuntimeError("loader not ready")
            child.send(json.dumps({"dirs": [str(d) for d in dirs]}))
            for event in events:
                if event["event"] == "loaded":
                    times[event["kind"]] = float(event["read_s"])
            child.finish(timeout)
        if set(times) != set(self.kinds):
            raise self._child.failure(f"loaded {sorted(times)} of {self.kinds}")
        return times

    def close(self) -> None:
        self._child.stop()


def make_small_files(directory: Path, count: int, size: int) -> None:
    """``count`` files of ``size`` bytes in folders of 100 (made once, reused)."""
    marker = directory / ".complete"
    if marker.exists():
        return
    shutil.rmtree(directory, ignore_errors=True)
    payload = os.urandom(size)
    for i in range(count):
        sub = directory / f"d{i // 100:04d}"
        if i % 100 == 0:
            sub.mkdir(parents=True, exist_ok=True)
        (sub / f"f{i:06d}.bin").write_bytes(payload)
    marker.write_text("")


def copy_small_files(source: Path, dest: Path, timeout: float) -> tuple[float | None, str]:
    start = time.perf_counter()
    try:
        subprocess.run(["cp", "-r", str(source), str(dest)], check=True, capture_output=True,
                       timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"cp -r did not finish in {timeout:.0f}s"
    except subprocess.CalledProcessError as exc:
        return None, f"cp -r failed: {exc.stderr.decode(errors='replace')[-300:]}"
    return time.perf_counter() - start, ""


def remove_tree(path: Path, timeout: float = 300.0) -> None:
    if path.exists():
        subprocess.run(["rm", "-rf", str(path)], capture_output=True, timeout=timeout)

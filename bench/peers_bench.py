"""Durability level ``peers: 1`` vs ``local`` vs the raw disk, and peer reads over TCP.

    python -m bench.peers_bench --out bench/results/peers      # ~1-2 minutes

One batch, same disk: a raw directory, one ``cistern-node`` with ``durability.level: local``,
and a three-node peer network (``peers: 1``) whose writer is measured. Every node holds its
uploads back (``uploadDelay`` 1h) so only the write path is timed; S3 is moto behind the fault
proxy. Figures: per-fsync latency (write 1 MiB + fsync, median and p90), checkpoint stall
(shards written and fsync'd, then ``.metadata.tmp`` + fsync + rename, as DCP does) and the
throughput of a cold read on another node of a file that is only on the writer (peer read).
Writes ``results.json`` and ``results.md`` into ``--out``; prints the table and the load.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from tests.support.node import NodeProcess
from tests.support.peers import Cluster
from tests.support.s3server import MotoServer

HELD_BACK = 3600.0
MiB = 2**20


def _write(path: Path, data: bytes) -> float:
    """Seconds for the fsync of a file just written (the write is not timed)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        started = time.perf_counter()
        os.fsync(f.fileno())
        return time.perf_counter() - started


def fsync_latencies(root: Path, count: int, size: int) -> list[float]:
    root.mkdir(parents=True, exist_ok=True)
    data = os.urandom(size)
    return [_write(root / f"f-{i}", data) for i in range(count)]


def checkpoint_stall(root: Path, shards: int, shard_size: int) -> float:
    root.mkdir(parents=True, exist_ok=True)
    data = os.urandom(shard_size)
    started = time.perf_counter()
    for i in range(shards):
        with open(root / f"__{i}_0.distcp", "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    with open(root / ".metadata.tmp", "wb") as f:
        f.write(os.urandom(64 * 1024))
        f.flush()
        os.fsync(f.fileno())
    os.rename(root / ".metadata.tmp", root / ".metadata")
    return time.perf_counter() - started


def _median_p90(values: list[float]) -> tuple[float, float]:
    ordered = sorted(values)
    return statistics.median(ordered), ordered[int(0.9 * (len(ordered) - 1))]


def run(out: Path, reps: int, fsyncs: int, shards: int, shard_mib: int,
        read_mib: int, transport: str = "auto") -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="cistern-peers-bench-"))
    results: dict[str, Any] = {"load_before": os.getloadavg(), "reps": reps,
                               "fsyncs": fsyncs, "fsync_size": MiB, "shards": shards,
                               "shard_bytes": shard_mib * MiB, "targets": {}}
    moto = MotoServer().start()
    s3 = moto.client()
    nodes: list[Any] = []
    try:
        bucket_local, bucket_peers = (f"bench-{uuid.uuid4().hex[:8]}" for _ in range(2))
        for bucket in (bucket_local, bucket_peers):
            s3.create_bucket(Bucket=bucket)
        (work / "local").mkdir()
        local = NodeProcess(work / "local", f"s3://{bucket_local}", endpoint_url=moto.endpoint,
                            frontend="pyfuse3", upload_delay=HELD_BACK).start()
        nodes.append(local)
        cluster = Cluster(work, bucket_peers, moto.endpoint, peer_timeout=2.0, dead_after=60.0,
                          transport=transport)
        for name in ("writer", "peer", "reader"):
            cluster.add(name, upload_delay=HELD_BACK)
        cluster.start()
        nodes.append(cluster)
        raw = work / "raw"
        targets: dict[str, Path] = {"raw": raw, "cistern local": local.mount,
                                    "cistern peers:1": cluster.nodes["writer"].mount}
        fsync_runs: dict[str, list[float]] = {name: [] for name in targets}
        stalls: dict[str, list[float]] = {name: [] for name in targets}
        for rep in range(reps):  # interleaved: every target sees the same load
            for name, root in targets.items():
                fsync_runs[name] += fsync_latencies(root / f"fsync-{rep}", fsyncs, MiB)
                stalls[name].append(checkpoint_stall(root / f"ckpt-{rep}", shards,
                                                     shard_mib * MiB))
        for name in targets:
            median, p90 = _median_p90(fsync_runs[name])
            results["targets"][name] = {"fsync_median_s": median, "fsync_p90_s": p90,
                                        "stall_median_s": statistics.median(stalls[name]),
                                        "stalls_s": stalls[name]}
        data = os.urandom(read_mib * MiB)
        shared = cluster.nodes["writer"].mount / "peer-read.bin"
        _write(shared, data)
        started = time.perf_counter()
        got = (cluster.nodes["reader"].mount / "peer-read.bin").read_bytes()
        elapsed = time.perf_counter() - started
        assert got == data, "peer read returned different bytes"
        peers = cluster.nodes["reader"].status().peers
        results["peer_read"] = {"bytes": len(data), "seconds": elapsed,
                                "mib_per_s": len(data) / MiB / elapsed,
                                "transport": peers.transport if peers else "?",
                                "transport_reason": peers.transport_reason if peers else ""}
        results["load_after"] = os.getloadavg()
    finally:
        for item in nodes:
            item.stop()
        moto.stop()
        shutil.rmtree(work, ignore_errors=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(report(results))
    return results


def report(results: dict[str, Any]) -> str:
    raw = results["targets"]["raw"]

    def ratio(value: float, reference: float) -> str:
        return f"{value / reference:.1f}x" if reference > 0 else "-"

    lines = [
        f"fsync of 1 MiB ({results['reps']} x {results['fsyncs']}), checkpoint of "
        f"{results['shards']} x {results['shard_bytes'] // MiB} MiB shards + .metadata "
        f"({results['reps']} reps); load average before/after "
        f"{results['load_before'][0]:.2f} / {results['load_after'][0]:.2f}", "",
        "| target | fsync median | fsync p90 | ratio to raw (median) | checkpoint stall "
        "(median) | ratio to raw |",
        "|---|---|---|---|---|---|"]
    for name, t in results["targets"].items():
        lines.append(
            f"| {name} | {t['fsync_median_s'] * 1000:.2f} ms | {t['fsync_p90_s'] * 1000:.2f} ms"
            f" | {ratio(t['fsync_median_s'], raw['fsync_median_s'])} | "
            f"{t['stall_median_s']:.3f} s | {ratio(t['stall_median_s'], raw['stall_median_s'])} |")
    read = results["peer_read"]
    lines += ["", f"Peer read over {read.get('transport', 'tcp')} on loopback (cold, another "
              f"node, file only on the writer): {read['bytes'] // MiB} MiB in "
              f"{read['seconds']:.2f} s = {read['mib_per_s']:.0f} MiB/s "
              f"({read.get('transport_reason', '')})", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/peers"))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--fsyncs", type=int, default=32, help="fsyncs of 1 MiB per rep")
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--shard-mib", type=int, default=16)
    parser.add_argument("--read-mib", type=int, default=128)
    parser.add_argument("--transport", choices=("auto", "tcp", "rdma"), default="auto",
                        help="peers.transport of the nodes (rdma: one-sided peer reads where "
                        "a device exists; the report names what was used and why)")
    args = parser.parse_args()
    results = run(args.out, args.reps, args.fsyncs, args.shards, args.shard_mib, args.read_mib,
                  args.transport)
    print(report(results))


if __name__ == "__main__":
    main()

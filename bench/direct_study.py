"""The direct-path study (issue 20, docs/dev/direct.md): fio through FUSE vs a followed directory.

``python -m bench.direct_study --out bench/results/direct`` (root; needs xfsprogs and fanotify)
runs, in interleaved repetitions of one batch, fio 256 KiB sequential write (1 job, end fsync):

* ``raw-ext4``: a plain directory on the disk the FUSE caches use;
* ``cistern-splice`` (and any ``--frontends``): the node daemon (upload delay 0), uploads to
  moto behind the bench's 35 ms proxy;
* ``raw-xfs``: a plain directory on a loop-mounted XFS image (reflink on, direct I/O loop);
* ``direct-xfs``: the same XFS directory followed by ``bench.direct_follow.Follower``, which
  snapshots each closed file with FICLONE and uploads it to the same proxy.

Uploads running: before each fio run on a Cistern mount or the followed directory, a file of
fio's size is written and closed there, so its upload runs while fio writes.

Writes ``results.json`` and ``results.md`` (medians, ratios to raw-ext4 in the same batch, the
load average before and after).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.direct_follow import Follower
from bench.s3env import TEST_CREDENTIALS, S3Env
from bench.targets import CisternTarget, Mounted
from bench.workloads import run_fio

log = logging.getLogger(__name__)
MiB = 1 << 20


class LoopXfs:
    """An XFS image with reflink, on a loop device in direct-I/O mode, mounted at ``path``."""

    def __init__(self, image: Path, path: Path, size: int) -> None:
        self.image, self.path, self.size = image, path, size
        self.device = ""

    def __enter__(self) -> LoopXfs:
        with open(self.image, "wb") as f:
            f.truncate(self.size)
        subprocess.run(["mkfs.xfs", "-q", "-f", "-m", "reflink=1", str(self.image)], check=True)
        self.device = subprocess.run(
            ["losetup", "-f", "--show", "--direct-io=on", str(self.image)], check=True,
            capture_output=True, text=True).stdout.strip()
        self.path.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "xfs", self.device, str(self.path)], check=True)
        return self

    def __exit__(self, *exc: object) -> None:
        if subprocess.run(["umount", str(self.path)], check=False).returncode:
            subprocess.run(["umount", "-l", str(self.path)], check=False)
        if self.device:
            subprocess.run(["losetup", "-d", self.device], check=False)
        self.image.unlink(missing_ok=True)


def s3_client(endpoint: str) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                        aws_access_key_id=TEST_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=TEST_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
                        config=Config(s3={"addressing_style": "path"}))


def write_file(path: Path, size: int) -> None:
    block = os.urandom(MiB)
    with open(path, "wb") as f:
        for _ in range(size // MiB):
            f.write(block)


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().split(" ", 3)[0]


def run(out: Path, reps: int, fio_size: int, frontends: list[str], workdir: Path) -> dict[str, Any]:
    results: dict[str, list[dict[str, float]]] = {}
    uploads_during: list[float] = []
    load = {"before": loadavg()}
    with S3Env(latency=0.035, error_rate=0.0) as env, \
            LoopXfs(workdir / "xfs.img", workdir / "xfs", 6 << 30) as xfs:
        env.create_bucket("direct")
        client = s3_client(env.proxy_endpoint)
        state = xfs.path / ".cistern"
        state.mkdir()
        root = xfs.path / "cache"
        root.mkdir()
        raw_ext4 = workdir / "raw-ext4"
        raw_xfs = xfs.path / "raw"
        follower = Follower(str(root), str(state), client, "direct", "ckpt/").start()
        try:
            for rep in range(reps):
                order = ["raw-ext4", *[f"cistern-{f}" for f in frontends], "raw-xfs",
                         "direct-xfs"]
                for name in order:
                    fio_out = out / f"fio-{name}-r{rep}.json"
                    if name.startswith("cistern-"):
                        result = _fio_cistern(env, name, rep, workdir, fio_size, fio_out)
                    elif name == "direct-xfs":
                        before = write_before(root, rep, fio_size)
                        start = time.monotonic()
                        result = run_fio(root / f"r{rep}", fio_size, 1, fio_out, 600).__dict__
                        fio_end = time.monotonic()
                        uploads_during.append(_overlap(follower, before, start, fio_end))
                        if not follower.wait_idle(600):
                            raise RuntimeError("the follower did not finish its uploads")
                        fio_up = [u for u in follower.state.uploads
                                  if u.path.startswith(f"r{rep}/")]
                        result["durable_after_close_s"] = (
                            max(u.done for u in fio_up) - fio_end if fio_up else -1.0)
                        shutil.rmtree(root / f"r{rep}")
                        os.unlink(before)
                    else:
                        directory = raw_ext4 if name == "raw-ext4" else raw_xfs
                        result = run_fio(directory, fio_size, 1, fio_out, 600).__dict__
                        shutil.rmtree(directory)
                    result["load"] = float(loadavg())
                    results.setdefault(name, []).append(result)
                    log.info("rep %d %s: %.0f MiB/s p99 %.2f ms (load %s)", rep, name,
                             result["bw_mib_s"], result["clat_p99_ms"], loadavg())
            follower.wait_idle(600)
        finally:
            follower.stop()
        stats = {"uploads": len(follower.state.uploads), "events": follower.state.events,
                 "skipped": follower.state.skipped, "deletes": follower.state.deletes,
                 "overflows": follower.state.overflows}
    load["after"] = loadavg()
    return {"results": results, "follower": stats, "load": load, "reps": reps,
            "fio_size": fio_size, "upload_overlap_s": uploads_during}


def write_before(root: Path, rep: int, size: int) -> Path:
    """A closed file whose upload runs while fio writes (the "uploads running" condition)."""
    before = root / f"previous-{rep}.bin"
    write_file(before, size)
    return before


def _overlap(follower: Follower, before: Path, start: float, end: float) -> float:
    """Seconds of fio's run during which the previous file's upload was still going."""
    rel = before.name
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        done = [u for u in follower.state.uploads if u.path == rel]
        if done:
            return max(0.0, min(done[-1].done, end) - start)
        time.sleep(0.05)  # bench only: the upload is running, nothing to wait on but it
    return -1.0


def _fio_cistern(env: S3Env, name: str, rep: int, workdir: Path, size: int,
                 fio_out: Path) -> dict[str, float]:
    target = CisternTarget(name.removeprefix("cistern-"), upload_delay=0.0)
    bucket = f"direct-{name}-r{rep}"
    env.create_bucket(bucket)
    tdir = workdir / f"{name}-r{rep}"
    tdir.mkdir()
    mounted: Mounted = target.mount(env, bucket, tdir)
    try:
        write_before(mounted.path, rep, size)  # its upload runs during fio, as for direct-xfs
        return dict(run_fio(mounted.path / "fio", size, 1, fio_out, 600).__dict__)
    finally:
        target.unmount(mounted)
        shutil.rmtree(tdir, ignore_errors=True)


def to_markdown(data: dict[str, Any]) -> str:
    res = data["results"]
    raw = statistics.median(r["bw_mib_s"] for r in res["raw-ext4"])
    raw_p99 = statistics.median(r["clat_p99_ms"] for r in res["raw-ext4"])
    lines = [f"fio 256 KiB seq write, 1 job, {data['fio_size'] // MiB} MiB, end fsync; "
             f"{data['reps']} interleaved reps, medians; load average {data['load']['before']} "
             f"before, {data['load']['after']} after.", "",
             "| target | MiB/s | x raw-ext4 | p99 ms | x raw-ext4 p99 | per-rep MiB/s (load) |",
             "|---|---|---|---|---|---|"]
    for name, rows in res.items():
        bw = statistics.median(r["bw_mib_s"] for r in rows)
        p99 = statistics.median(r["clat_p99_ms"] for r in rows)
        reps = ", ".join(f"{r['bw_mib_s']:.0f} ({r['load']:.1f})" for r in rows)
        lines.append(f"| {name} | {bw:.0f} | {bw / raw:.2f} | {p99:.3f} | {p99 / raw_p99:.2f} | "
                     f"{reps} |")
    durable = [r["durable_after_close_s"] for r in res.get("direct-xfs", [])]
    lines += ["", f"direct-xfs: fio's file complete in S3 {statistics.median(durable):.2f} s "
              f"after fio ended (median); the previous file's upload overlapped fio for "
              f"{', '.join(f'{s:.2f}' for s in data['upload_overlap_s'])} s; follower "
              f"{data['follower']}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/direct"))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--fio-size", type=int, default=512 * MiB)
    parser.add_argument("--frontends", default="splice",
                        help="Cistern front ends in the same batch (comma list; '' for none)")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="direct-study-", dir=args.workdir))
    try:
        data = run(args.out, args.reps, args.fio_size,
                   [f for f in args.frontends.split(",") if f], workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    (args.out / "results.json").write_text(json.dumps(data, indent=1))
    (args.out / "results.md").write_text(to_markdown(data))
    print(to_markdown(data))


if __name__ == "__main__":
    main()

"""Where one multipart upload spends its time: the node's own request path (``S3Store``) against
moto behind the latency proxy, with the node's and moto's CPU seconds.

    python -m bench.upload_path [--mib 256] [--part-mib 16] [--in-flight 8] [--reps 2]

Per repetition: wall time and MiB/s of the parts, CPU seconds of this process (the node's
hashing, signing and copies: ``time.process_time``) and of the moto server (``/proc``), then
the CompleteMultipartUpload. Run it from two trees (``PYTHONPATH``) to compare request paths;
docs/benchmarks.md ("Durable sooner, second pass") has the figures.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

from bench.s3env import TEST_CREDENTIALS, S3Env, tree_cpu_seconds
from cistern.cachenode.s3store import S3Store
from cistern.config import StoreConfig

BUCKET = "bench-upload-path"


def _one(store: S3Store, moto_pid: int, key: str, fd: int, part: int, count: int,
         in_flight: int) -> str:
    started, cpu, moto = time.monotonic(), time.process_time(), tree_cpu_seconds(moto_pid)
    upload_id = store.create_multipart(key, {})

    def send(number: int) -> tuple[int, str]:
        return number, store.upload_part(key, upload_id, number, fd, (number - 1) * part, part)

    with ThreadPoolExecutor(in_flight) as pool:
        parts = list(pool.map(send, range(1, count + 1)))
    sent = time.monotonic()
    node_cpu, moto_cpu = time.process_time() - cpu, tree_cpu_seconds(moto_pid) - moto
    store.complete_multipart(key, upload_id, parts)
    done = time.monotonic()
    mib = part * count / 2**20
    complete_cpu = tree_cpu_seconds(moto_pid) - moto - moto_cpu
    return (f"parts {sent - started:.2f} s ({mib / (sent - started):.1f} MiB/s), node CPU "
            f"{node_cpu:.2f} s, moto CPU {moto_cpu:.2f} s; complete {done - sent:.2f} s "
            f"(moto CPU {complete_cpu:.2f} s = {complete_cpu * 1000 / mib:.2f} ms/MiB: moto "
            f"concatenates the parts); load {os.getloadavg()[0]:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--part-mib", type=int, default=16)
    parser.add_argument("--in-flight", type=int, default=8)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--latency", type=float, default=0.035)
    args = parser.parse_args()
    part = args.part_mib * 2**20
    count = args.mib // args.part_mib
    os.environ.update(TEST_CREDENTIALS)
    with tempfile.TemporaryFile() as blob, S3Env(args.latency, 0.0) as env:
        for _ in range(count):
            blob.write(os.urandom(part))
        blob.flush()
        env.create_bucket(BUCKET)
        moto_pid = env.moto_pid
        store = S3Store(StoreConfig(url=f"s3://{BUCKET}/", endpoint_url=env.proxy_endpoint,
                                    region="us-east-1", path_style=True))
        for rep in range(args.reps):
            print(f"rep {rep + 1}: "
                  f"{_one(store, moto_pid, f'o{rep}', blob.fileno(), part, count, args.in_flight)}")


if __name__ == "__main__":
    main()

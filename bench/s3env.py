"""The benchmark's own S3: a moto server behind the latency/fault proxy (a separate process).

Targets talk to ``proxy_endpoint`` (delayed, optionally failing, counted). The harness itself
creates buckets, polls for durability and cleans up through ``direct`` (moto, uncounted), so
its polling never shows in the request counts.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from tests.support.faultproxy import FaultProxyProcess, ProxyControl
from tests.support.s3server import TEST_CREDENTIALS, MotoServer

logger = logging.getLogger(__name__)

__all__ = ["S3Env", "TEST_CREDENTIALS", "tree_cpu_seconds"]


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) of ``pid`` and its living descendants, from ``/proc``
    (a mount command may be a wrapper around the process doing the work)."""
    stats: dict[int, tuple[int, float]] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        stats[int(name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    tree, total, grew = {pid}, 0.0, True
    while grew:
        grew = False
        for child, (parent, _) in stats.items():
            if parent in tree and child not in tree:
                tree.add(child)
                grew = True
    for member in tree:
        total += stats.get(member, (0, 0.0))[1]
    return total


@dataclass
class DurableResult:
    seconds: float | None
    missing: list[str]


class S3Env:
    def __init__(self, latency: float, error_rate: float) -> None:
        self.latency = latency
        self.error_rate = error_rate
        self._moto = MotoServer()
        self._proxy: FaultProxyProcess | None = None
        self.direct: Any = None

    @property
    def moto_endpoint(self) -> str:
        return self._moto.endpoint

    @property
    def moto_pid(self) -> int:
        """The moto server's process (its CPU seconds: bench/upload_path.py)."""
        return self._moto.pid

    @property
    def proxy_endpoint(self) -> str:
        assert self._proxy is not None
        return self._proxy.endpoint

    @property
    def proxy(self) -> ProxyControl:
        assert self._proxy is not None
        return self._proxy.control

    def start(self) -> S3Env:
        self._moto.start()
        self.direct = self._moto.client()
        self._proxy = FaultProxyProcess(self._moto.endpoint, latency=self.latency,
                                        error_rate=self.error_rate).start()
        logger.info("S3: moto %s behind proxy %s (latency %.0f ms, 503 rate %.2f)",
                    self._moto.endpoint, self._proxy.endpoint, self.latency * 1000,
                    self.error_rate)
        return self

    def stop(self) -> None:
        if self._proxy is not None:
            self._proxy.stop()
        self._moto.stop()

    def __enter__(self) -> S3Env:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- bucket helpers (direct to moto, never counted) ---------------------------------

    def create_bucket(self, name: str) -> None:
        self.direct.create_bucket(Bucket=name)

    def listing(self, bucket: str, prefix: str = "") -> dict[str, int]:
        sizes: dict[str, int] = {}
        paginator = self.direct.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                sizes[obj["Key"]] = int(obj["Size"])
        return sizes

    def wait_objects(self, bucket: str, expected: dict[str, int], since: float,
                     timeout: float, interval: float = 0.05) -> DurableResult:
        """Wait until every expected key exists with its size; seconds measured from ``since``
        (a ``time.time()`` value, so it may come from another process)."""
        prefix = _common_prefix(list(expected))
        deadline = time.monotonic() + timeout
        while True:
            listed = self.listing(bucket, prefix)
            missing = [k for k, size in expected.items() if listed.get(k) != size]
            now = time.time()
            if not missing:
                return DurableResult(now - since, [])
            if time.monotonic() > deadline:
                return DurableResult(None, missing)
            time.sleep(interval)

    def empty_bucket(self, bucket: str) -> None:
        try:
            keys = list(self.listing(bucket))
        except self.direct.exceptions.NoSuchBucket:
            return
        for start in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[start:start + 1000]]
            self.direct.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
        uploads = self.direct.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
        for upload in uploads:
            self.direct.abort_multipart_upload(Bucket=bucket, Key=upload["Key"],
                                               UploadId=upload["UploadId"])

    def delete_bucket(self, bucket: str) -> None:
        self.empty_bucket(bucket)
        try:
            self.direct.delete_bucket(Bucket=bucket)
        except Exception as exc:  # noqa: BLE001 - cleanup of a throwaway bucket
            logger.warning("could not delete bucket %s: %s", bucket, exc)

    def wait_quiet(self, settle: float = 1.5, timeout: float = 60.0) -> dict[str, int]:
        """Wait until the proxy has seen no request for ``settle`` seconds; return the counts."""
        deadline = time.monotonic() + timeout
        last = self.proxy.counts()
        quiet_since = time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.25)
            now = self.proxy.counts()
            if now != last:
                last, quiet_since = now, time.monotonic()
            elif time.monotonic() - quiet_since >= settle:
                break
        return last


def _common_prefix(keys: list[str]) -> str:
    if not keys:
        return ""
    first, last = min(keys), max(keys)
    n = 0
    while n < min(len(first), len(last)) and first[n] == last[n]:
        n += 1
    return first[:n]

"""The one way the node talks to its object store: pacing, retries, metrics, error record.

Every request — the flusher's uploads, copies and deletes, and the read path's listings and
fetches — goes through ``StoreClient``: one request token from the node's bucket (and, for
uploads, byte tokens), the retry policy for its kind of request (exponential backoff, full
jitter, deadline), the adaptive rate cut on throttling, and the request and error metrics.
Errors keep their classes from store.py (``TemporaryStoreError``, ``PermanentStoreError``,
``FileNotFoundError`` for a missing object); the last attempt's error is what the caller sees.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from cistern.cachenode.metrics import Metrics
from cistern.cachenode.ratelimit import AdaptiveRate, TokenBucket
from cistern.cachenode.retry import RetryPolicy
from cistern.cachenode.store import ObjectInfo, ObjectStore, PreconditionFailed, StoreError
from cistern.config import FlushPolicy

__all__ = ["StoreClient", "StoreErrors"]

log = logging.getLogger(__name__)
T = TypeVar("T")

WRITE_RETRY = RetryPolicy(deadline=300.0)
"""Uploads, copies and deletes: the flusher has time, the data is safe on local disk."""
LIST_RETRY = RetryPolicy(deadline=5.0)
"""Listings: a blip must not hide a checkpoint, an outage must not block a writer."""
FETCH_RETRY = RetryPolicy(deadline=60.0)
"""Fetches on open: a reader waits, but not forever."""
CHECK_RETRY = RetryPolicy(deadline=10.0)
"""The start-up check: throttling is retried, a missing bucket is not."""


class StoreErrors:
    """The errors seen: a total and the 20 most recent, for /status. Thread-safe."""

    def __init__(self, keep: int = 20) -> None:
        self._lock = threading.Lock()
        self._recent: list[dict[str, object]] = []
        self._keep = keep
        self.total = 0

    def add(self, what: str, exc: BaseException) -> None:
        record = {"time": time.time(), "op": what, "error": str(exc)[:300],
                  "code": getattr(exc, "code", type(exc).__name__)}
        with self._lock:
            self.total += 1
            self._recent.append(record)
            del self._recent[:-self._keep]

    @property
    def recent(self) -> list[dict[str, object]]:
        with self._lock:
            return list(self._recent)


class StoreClient:
    def __init__(self, store: ObjectStore, policy: FlushPolicy | None = None,
                 metrics: Metrics | None = None, retry: RetryPolicy = WRITE_RETRY) -> None:
        policy = policy or FlushPolicy()
        self.store = store
        self.description = store.description
        self.metrics = metrics or Metrics()
        self.retry = retry
        self._policy = policy
        self.bytes_bucket = TokenBucket(policy.max_bytes_per_second,
                                        burst=policy.max_bytes_per_second)
        self.request_bucket = TokenBucket(policy.max_requests_per_second)
        self.adaptive = AdaptiveRate(self.request_bucket, policy.max_requests_per_second)
        self.errors = StoreErrors()
        self._lock = threading.Lock()
        self.uploaded_bytes_total = 0
        self._stop = threading.Event()

    def stop(self) -> None:
        """Cut short every wait for tokens or a retry: requests in progress fail now."""
        self._stop.set()

    def set_evacuation(self, on: bool) -> None:
        """During a drain the upload byte rate is the evacuation rate (None: unlimited)."""
        policy = self._policy
        self.bytes_bucket.set_rate(policy.evacuation_bytes_per_second if on
                                   else policy.max_bytes_per_second)

    # -------------------------------------------------------------- the one request path

    def request(self, op: str, fn: Callable[[], T], *, nbytes: int = 0,
                retry: RetryPolicy | None = None, what: str | None = None) -> T:
        """Run one store call ``fn`` (metric label ``op``) paced, retried and counted.

        ``nbytes`` is what the call uploads (byte tokens, uploaded-bytes counters).
        """
        metrics = self.metrics

        def attempt() -> T:
            waited = self.request_bucket.acquire(1, self._stop)
            if nbytes:
                waited += self.bytes_bucket.acquire(nbytes, self._stop)
            if waited:
                metrics.rate_limited_seconds.inc(waited)
            metrics.requests.labels(op).inc()
            try:
                result = fn()
            except StoreError:
                if nbytes:
                    self.bytes_bucket.refund(nbytes)
                raise
            self.adaptive.on_success()
            if nbytes:
                # Counted per request (part), so rate() over the counter shows progress
                # during a long multipart upload.
                metrics.uploaded_bytes.inc(nbytes)
                with self._lock:
                    self.uploaded_bytes_total += nbytes
            return result

        def record(exc: StoreError) -> None:
            self.errors.add(what or op, exc)
            metrics.errors.labels(exc.code).inc()
            if getattr(exc, "throttled", False):
                metrics.throttles.inc()
                self.adaptive.on_throttle()
            log.debug("%s: %s", what or op, exc)

        return (retry or self.retry).call(what or op, attempt, on_error=record, stop=self._stop)

    # -------------------------------------------------------------- writes (the flusher)

    def put_file(self, key: str, fd: int, size: int, metadata: dict[str, str],
                 if_match: str | None = None, if_none_match: bool = False) -> str:
        return self.request("put", lambda: self.store.put_file(
            key, fd, size, metadata, if_match=if_match, if_none_match=if_none_match),
                            nbytes=size)

    def create_multipart(self, key: str, metadata: dict[str, str]) -> str:
        return self.request("create-multipart",
                            lambda: self.store.create_multipart(key, metadata))

    def upload_part(self, key: str, upload_id: str, number: int, fd: int, offset: int,
                    length: int) -> str:
        return self.request("upload-part", lambda: self.store.upload_part(
            key, upload_id, number, fd, offset, length), nbytes=length)

    def complete_multipart(self, key: str, upload_id: str, parts: list[tuple[int, str]],
                           if_match: str | None = None, if_none_match: bool = False) -> str:
        return self.request("complete-multipart", lambda: self.store.complete_multipart(
            key, upload_id, parts, if_match=if_match, if_none_match=if_none_match))

    def abort_multipart(self, key: str, upload_id: str) -> None:
        self.request("abort-multipart", lambda: self.store.abort_multipart(key, upload_id))

    def list_multipart(self, key: str) -> list[str]:
        return self.request("list-multipart", lambda: self.store.list_multipart(key))

    def copy(self, src: str, dst: str, metadata: dict[str, str] | None = None) -> None:
        self.request("copy", lambda: self.store.copy(src, dst, metadata))

    def delete(self, key: str) -> None:
        self.request("delete", lambda: self.store.delete(key))

    # -------------------------------------------------------------- reads (read-through)

    def list_dir(self, prefix: str) -> tuple[list[ObjectInfo], list[str]]:
        return self.request("list", lambda: self.store.list_dir(prefix), retry=LIST_RETRY,
                            what=f"list {prefix or '/'}")

    def download(self, key: str, fd: int) -> ObjectInfo:
        return self.request("get", lambda: self.store.download(key, fd), retry=FETCH_RETRY,
                            what=f"fetch {key}")

    def head(self, key: str) -> ObjectInfo:
        return self.request("head", lambda: self.store.head(key), retry=LIST_RETRY,
                            what=f"head {key}")

    def check_etag(self, key: str, etag: str) -> None:
        """``PreconditionFailed`` unless the object at ``key`` is still the one of ``etag``: the
        guard before a CompleteMultipartUpload whose ``If-Match`` the store may ignore
        (docs/dev/cachenode.md, Coherence). (pc, issue 15)"""
        try:
            current: str | None = self.head(key).etag
        except FileNotFoundError:
            current = None
        if current != etag:
            raise PreconditionFailed(f"complete-multipart {key}: the object is "
                                     f"{current or 'absent'}, not {etag}")

    def check(self) -> None:
        """Reachable and writable with these credentials (retried briefly)."""
        self.request("check", self.store.check, retry=CHECK_RETRY,
                     what="check the object store")

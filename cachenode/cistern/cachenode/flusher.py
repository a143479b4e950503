"""The flusher: moves dirty data to the object store in the background.

It asks the core for due work, runs it on a bounded pool (``maxConcurrentUploads`` files at a
time, multipart parts on a second pool of the same size), paces every request through the
node's token buckets, retries temporary errors with backoff and jitter, and reports results
back to the core, which journals them. It never decides what is safe: the core does.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from cistern.cachenode.core import CacheCore, DeleteWork, MoveWork, UploadWork, Work
from cistern.cachenode.metrics import Metrics
from cistern.cachenode.ratelimit import AdaptiveRate, TokenBucket
from cistern.cachenode.retry import RetryPolicy
from cistern.cachenode.store import ObjectStore, PermanentStoreError, StoreError
from cistern.config import FlushPolicy

__all__ = ["Flusher"]

log = logging.getLogger(__name__)


@dataclass
class _Errors:
    recent: list[dict[str, object]] = field(default_factory=list)
    total: int = 0

    def add(self, what: str, exc: Exception) -> None:
        self.total += 1
        self.recent.append({"time": time.time(), "op": what, "error": str(exc)[:300],
                            "code": getattr(exc, "code", type(exc).__name__)})
        del self.recent[:-20]


class _SourceChanged(Exception):
    """The file was opened for writing while its upload read it: upload it again later."""


class Flusher:
    def __init__(self, core: CacheCore, store: ObjectStore, policy: FlushPolicy,
                 metrics: Metrics, retry: RetryPolicy | None = None) -> None:
        self.core = core
        self.store = store
        self.policy = policy
        self.metrics = metrics
        self.retry = retry or RetryPolicy(deadline=300.0)
        self.bytes_bucket = TokenBucket(policy.max_bytes_per_second,
                                        burst=policy.max_bytes_per_second)
        self.request_bucket = TokenBucket(policy.max_requests_per_second)
        self.adaptive = AdaptiveRate(self.request_bucket, policy.max_requests_per_second)
        self.errors = _Errors()
        self.uploaded_bytes_total = 0
        self._count_lock = threading.Lock()
        self.uploaded_objects_total = 0
        self.last_flush_time: float | None = None
        self._stop = threading.Event()
        self._files = ThreadPoolExecutor(policy.max_concurrent_uploads,
                                         thread_name_prefix="upload")
        self._parts = ThreadPoolExecutor(policy.max_concurrent_uploads,
                                         thread_name_prefix="part")
        self._busy = 0
        self._thread = threading.Thread(target=self._run, name="flusher", daemon=True)
        self._evacuating = False

    # -------------------------------------------------------------- lifecycle

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        with self.core.changed:
            self.core.changed.notify_all()
        self._thread.join(timeout)
        self._files.shutdown(wait=True, cancel_futures=True)
        self._parts.shutdown(wait=True, cancel_futures=True)

    def set_evacuation(self, on: bool) -> None:
        """During a drain the byte rate is the evacuation rate (None: unlimited)."""
        self._evacuating = on
        rate = self.policy.evacuation_bytes_per_second if on else self.policy.max_bytes_per_second
        self.bytes_bucket.set_rate(rate)

    # -------------------------------------------------------------- loop

    def _run(self) -> None:
        self._clean_stale_uploads()
        while not self._stop.is_set():
            free = self.policy.max_concurrent_uploads - self._busy
            work = self.core.collect_work(free) if free > 0 else []
            if not work:
                # Poll rather than wake on every change: a burst of thousands of creates
                # would otherwise rescan the pending set once per file.
                self._stop.wait(0.05)
                continue
            if any(not isinstance(item, UploadWork) for item in work):
                # Power-loss rule: a rename or delete is durable in the journal before the
                # store is changed for it (a copy + delete done for a rename the crash
                # undid would leave the file pointing at a deleted object).
                self.core.sync_journal()
            with self.core.changed:
                self._busy += len(work)
            for item in work:
                self._files.submit(self._execute, item)

    def _clean_stale_uploads(self) -> None:
        """Abort multipart uploads that were in flight when the daemon last stopped."""
        for key, upload_id in self.core.finish_stale_uploads():
            try:
                ids = set(self._request("list-multipart",
                                        lambda k=key: self.store.list_multipart(k)))
                if upload_id:
                    ids.add(upload_id)
                for uid in ids:
                    self._request("abort-multipart",
                                  lambda k=key, u=uid: self.store.abort_multipart(k, u))
                    log.info("aborted interrupted multipart upload of %s (%s)", key, uid)
            except StoreError as exc:
                log.warning("could not clean up interrupted upload of %s: %s", key, exc)
                with self.core.changed:
                    self.core.stale_uploads.append((key, upload_id))

    def _execute(self, work: Work) -> None:
        try:
            if isinstance(work, UploadWork):
                self._upload(work)
            elif isinstance(work, MoveWork):
                self._move(work)
            else:
                self._delete(work)
        except Exception:  # a bug must not kill the pool thread silently
            log.exception("flusher failed on %s", work)
        finally:
            with self.core.changed:
                self._busy -= 1
                self.core.changed.notify_all()

    # -------------------------------------------------------------- requests

    def _on_error(self, op: str) -> object:
        def record(exc: StoreError) -> None:
            code = exc.code
            self.errors.add(op, exc)
            self.metrics.errors.labels(code).inc()
            if getattr(exc, "throttled", False):
                self.metrics.throttles.inc()
                self.adaptive.on_throttle()
            log.debug("%s: %s", op, exc)

        return record

    def _request(self, op: str, fn, nbytes: int = 0):  # type: ignore[no-untyped-def]
        def attempt():  # type: ignore[no-untyped-def]
            waited = self.request_bucket.acquire(1, self._stop)
            if nbytes:
                waited += self.bytes_bucket.acquire(nbytes, self._stop)
            if waited:
                self.metrics.rate_limited_seconds.inc(waited)
            self.metrics.requests.labels(op).inc()
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
                self.metrics.uploaded_bytes.inc(nbytes)
                with self._count_lock:
                    self.uploaded_bytes_total += nbytes
            return result

        return self.retry.call(op, attempt, on_error=self._on_error(op),  # type: ignore[arg-type]
                               stop=self._stop)

    def _upload(self, work: UploadWork) -> None:
        started = time.monotonic()
        etag: str | None = None
        error: Exception | None = None
        try:
            # Rules: data and intent durable before the upload; never a torn object.
            if not self.core.prepare_upload(work):
                raise _SourceChanged(work.path)
            if work.size >= self.policy.multipart_threshold:
                etag = self._multipart(work)
            else:
                etag = self._put_snapshot(work)
        except _SourceChanged as exc:
            error = exc
            log.debug("%s was opened for writing during its upload; it is uploaded again",
                      work.path)
        except (StoreError, OSError) as exc:
            error = exc
            if not isinstance(exc, StoreError):
                self.errors.add(f"upload {work.key}", exc)
            level = logging.ERROR if isinstance(exc, PermanentStoreError) else logging.WARNING
            log.log(level, "upload of %s failed, will retry: %s", work.path, exc)
        finally:
            os.close(work.fd)
        self.core.finish_upload(work, etag, error)
        if error is None:
            self.metrics.upload_seconds.observe(time.monotonic() - started)
            self.metrics.uploaded_objects.inc()
            self.uploaded_objects_total += 1
            self.last_flush_time = time.time()
            log.debug("uploaded %s (%d bytes) in %.3fs", work.key, work.size,
                      time.monotonic() - started)

    def _put_snapshot(self, work: UploadWork) -> str:
        """A single PUT from a private copy of the file, taken while nobody wrote it: a
        rewrite racing the upload then costs a retry, never a torn object in the store."""
        snap = os.memfd_create(f"upload-{work.ino}", os.MFD_CLOEXEC)
        try:
            copied = 0
            while copied < work.size:
                sent = os.sendfile(snap, work.fd, copied, work.size - copied)
                if sent == 0:
                    raise _SourceChanged(work.path)  # it shrank: a truncate raced us
                copied += sent
            if not self.core.upload_source_current(work):
                raise _SourceChanged(work.path)
            return str(self._request("put", lambda: self.store.put_file(
                work.key, snap, work.size, work.metadata), nbytes=work.size))
        finally:
            os.close(snap)

    def _multipart(self, work: UploadWork) -> str:
        upload_id = self._request("create-multipart",
                                  lambda: self.store.create_multipart(work.key, work.metadata))
        self.core.set_upload_id(work, upload_id)
        part_size = self.policy.part_size
        count = max(1, -(-work.size // part_size))
        if count > 10000:
            part_size = -(-work.size // 10000)
            count = -(-work.size // part_size)
        futures: list[Future[str]] = []
        try:
            for number in range(1, count + 1):
                offset = (number - 1) * part_size
                length = min(part_size, work.size - offset)
                futures.append(self._parts.submit(
                    self._request, "upload-part",
                    lambda n=number, o=offset, ln=length: self.store.upload_part(
                        work.key, upload_id, n, work.fd, o, ln), length))
            parts = [(n + 1, f.result()) for n, f in enumerate(futures)]
            if not self.core.upload_source_current(work):
                raise _SourceChanged(work.path)  # aborted below: no torn object
            return str(self._request("complete-multipart", lambda: self.store.complete_multipart(
                work.key, upload_id, parts)))
        except BaseException:
            for f in futures:
                f.cancel()
            for f in futures:
                if not f.cancelled():
                    with contextlib.suppress(BaseException):  # aborted below either way
                        f.result()
            try:
                self._request("abort-multipart",
                              lambda: self.store.abort_multipart(work.key, upload_id))
            except StoreError as exc:
                log.warning("could not abort multipart upload of %s: %s", work.key, exc)
            raise

    def _move(self, work: MoveWork) -> None:
        error: Exception | None = None
        try:
            self._request("copy", lambda: self.store.copy(work.src, work.dst, work.metadata))
            if work.src != work.dst:
                self.metrics.copies.inc()
        except (StoreError, FileNotFoundError) as exc:
            error = exc
            log.warning("copy of %s to %s failed, will retry: %s", work.src, work.dst, exc)
        self.core.finish_move(work, error)

    def _delete(self, work: DeleteWork) -> None:
        error: Exception | None = None
        try:
            self._request("delete", lambda: self.store.delete(work.key))
            self.metrics.deletes.inc()
        except StoreError as exc:
            error = exc
            log.warning("delete of %s failed, will retry: %s", work.key, exc)
        self.core.finish_delete(work, error)

    # -------------------------------------------------------------- waiting

    def wait_idle(self, timeout: float, upto_seq: int | None = None,
                  progress: threading.Event | None = None) -> bool:
        deadline = time.monotonic() + timeout
        with self.core.changed:
            while not self.core.idle(upto_seq):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.core.changed.wait(min(left, 0.2))
        return True

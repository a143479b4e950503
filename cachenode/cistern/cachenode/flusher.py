"""The flusher: moves dirty data to the object store in the background.

It asks the core for due work, runs it on a bounded pool (``maxConcurrentUploads`` files at a
time, multipart parts on a second pool of the same size) and reports results back to the core,
which journals them. Every request goes through the node's ``StoreClient`` (token buckets,
retries with backoff and jitter, metrics). It never decides what is safe: the core does. Its
own counters are guarded by its own lock; it never holds the core's.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from cistern.cachenode.core import CacheCore, DeleteWork, MoveWork, UploadWork, Work
from cistern.cachenode.core.model import WRITER_KEY
from cistern.cachenode.store import (
    CHECKSUM_KEY,
    ObjectInfo,
    PermanentStoreError,
    PreconditionFailed,
    StoreError,
    hash_range,
    part_size_for,
)
from cistern.cachenode.storeclient import StoreClient
from cistern.cachenode.streamer import Streamer
from cistern.config import FlushPolicy

__all__ = ["Flusher"]

log = logging.getLogger(__name__)

POLL_SECONDS = 0.05
"""How often the flusher asks the core for work when it found none."""


class _SourceChanged(Exception):
    """The file was opened for writing while its upload read it: upload it again later."""


class Flusher:
    def __init__(self, core: CacheCore, client: StoreClient, policy: FlushPolicy) -> None:
        self.core = core
        self.client = client
        self.policy = policy
        self.metrics = client.metrics
        self._lock = threading.Lock()
        self._busy = 0
        self.uploaded_objects_total = 0
        self.conflicts_total = 0
        self.last_conflict: str | None = None
        self.last_conflict_time: float | None = None
        self.last_flush_time: float | None = None
        self._stop = threading.Event()
        self._files = ThreadPoolExecutor(policy.max_concurrent_uploads,
                                         thread_name_prefix="upload")
        # Parts of every multipart upload, streamed or not, share one node-wide pool
        # (flush.maxConcurrentParts); streams of files still being written: streamer.py.
        self._parts = ThreadPoolExecutor(policy.max_concurrent_parts,
                                         thread_name_prefix="part")
        self.streamer = Streamer(core, client, policy, self._parts)
        self._thread = threading.Thread(target=self._run, name="flusher", daemon=True)

    # -------------------------------------------------------------- lifecycle

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop taking work and cut short the store requests in progress (they stay dirty
        and are uploaded again on the next start)."""
        self._stop.set()
        self.client.stop()
        self._thread.join(timeout)
        self.streamer.stop()
        self._files.shutdown(wait=True, cancel_futures=True)
        self._parts.shutdown(wait=True, cancel_futures=True)

    def set_evacuation(self, on: bool) -> None:
        """During a drain the byte rate is the evacuation rate (None: unlimited)."""
        self.client.set_evacuation(on)

    @property
    def busy(self) -> int:
        """Operations handed to the pool and not finished yet."""
        with self._lock:
            return self._busy

    # -------------------------------------------------------------- loop

    def _run(self) -> None:
        self._clean_stale_uploads()
        while not self._stop.is_set():
            self.streamer.poll()  # streams of large files still being written
            free = self.policy.max_concurrent_uploads - self.busy
            work = self.core.collect_work(free) if free > 0 else []
            if not work:
                # Poll rather than wake on every change: a burst of thousands of creates
                # would otherwise rescan the pending set once per file.
                self._stop.wait(POLL_SECONDS)
                continue
            if any(not isinstance(item, UploadWork) for item in work):
                # Power-loss rule: a rename or delete is durable in the journal before the
                # store is changed for it (a copy + delete done for a rename the crash
                # undid would leave the file pointing at a deleted object).
                self.core.sync_journal()
            with self._lock:
                self._busy += len(work)
            for item in work:
                self._files.submit(self._execute, item)

    def _clean_stale_uploads(self) -> None:
        """Abort multipart uploads that were in flight when the daemon last stopped."""
        for key, upload_id in self.core.finish_stale_uploads():
            try:
                ids = set(self.client.list_multipart(key))
                if upload_id:
                    ids.add(upload_id)
                for uid in ids:
                    self.client.abort_multipart(key, uid)
                    log.info("aborted interrupted multipart upload of %s (%s)", key, uid)
            except StoreError as exc:
                log.warning("could not clean up interrupted upload of %s: %s", key, exc)
                self.core.return_stale_upload(key, upload_id)

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
            with self._lock:
                self._busy -= 1

    # -------------------------------------------------------------- operations

    def _upload(self, work: UploadWork) -> None:
        started = time.monotonic()
        etag: str | None = None
        error: Exception | None = None
        try:
            # Rules: data and intent durable before the upload; never a torn object.
            if not self.core.prepare_upload(work):
                raise _SourceChanged(work.path)
            if work.size >= self.policy.multipart_threshold:
                etag = self._conditionally(work, lambda key, if_match, if_none_match:
                                           self._multipart(work, key, if_match, if_none_match))
            else:
                etag = self._put_snapshot(work)
        except PreconditionFailed as exc:
            error = exc  # a conflict, already kept and logged by _keep_conflict; not retried
        except _SourceChanged as exc:
            error = exc
            log.debug("%s was opened for writing during its upload; it is uploaded again",
                      work.path)
        except (StoreError, OSError) as exc:
            error = exc
            if not isinstance(exc, StoreError):
                self.client.errors.add(f"upload {work.key}", exc)
            level = logging.ERROR if isinstance(exc, PermanentStoreError) else logging.WARNING
            log.log(level, "upload of %s failed, will retry: %s", work.path, exc)
        finally:
            os.close(work.fd)
        self.core.finish_upload(work, etag, error)
        if error is None:
            self.metrics.upload_seconds.observe(time.monotonic() - started)
            self.metrics.uploaded_objects.inc()
            with self._lock:
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
            return self._conditionally(work, lambda key, if_match, if_none_match:
                                       self.client.put_file(key, snap, work.size,
                                                            work.metadata, if_match=if_match,
                                                            if_none_match=if_none_match))
        finally:
            os.close(snap)

    def _conditionally(self, work: UploadWork, send: Callable[[str, str | None, bool], str]
                       ) -> str:
        """``send(key, if_match, if_none_match)`` this version to its key, conditional on what
        the node knows is there (docs/dev/cachenode.md, Coherence); on a failed precondition
        once more if ``_second_chance`` allows, else it is kept under a conflict name."""
        try:
            return send(work.key, work.if_match, work.if_none_match)
        except PreconditionFailed:
            try:
                info: ObjectInfo | None = self.client.head(work.key)
            except FileNotFoundError:
                info = None
            again = self._second_chance(work.key, work.metadata, info)
            if again is None:
                if info is not None and self._holds_this_version(work, info):
                    return str(info.etag)
                self._keep_conflict(work, send)
                raise
        try:
            return send(work.key, again or None, not again)
        except PreconditionFailed:  # another writer came in since the HEAD
            self._keep_conflict(work, send)
            raise

    def _second_chance(self, key: str, metadata: dict[str, str], info: ObjectInfo | None
                       ) -> str | None:
        """After a 412: what the upload may be conditional on instead, or None (a conflict).

        - The object at ``key`` names this cache as its writer (``WRITER_KEY``, stored with
          it atomically): it is the result of this cache's own earlier upload or copy (a
          rename) that a power cut kept out of the journal — this entry's previous version,
          or the copy of a file since replaced by this one; it is replaced, conditional on
          its ETag. Another writer's object never names this cache.
        - There is no object (another writer deleted it): this node's newer version is not
          thrown away, it is uploaded create-only (``""``: If-None-Match).
        Anything else is another writer's object (docs/dev/cachenode.md, Power loss and
        Coherence). A store that keeps no metadata never matches the first case."""
        if info is None:
            log.warning("%s was deleted from the store by another writer; this node's "
                        "version is uploaded again (create-only)", key)
            return ""
        ours = metadata.get(WRITER_KEY, "").partition(":")[0]
        theirs = info.metadata.get(WRITER_KEY, "").partition(":")[0]
        if not ours or theirs != ours or not info.etag:
            return None
        log.warning("%s: the object in the store was written by this cache (%s) but the "
                    "journal lost its result in a crash; it is replaced", key,
                    info.metadata.get(WRITER_KEY))
        return info.etag

    def _holds_this_version(self, work: UploadWork, info: ObjectInfo) -> bool:
        """After a 412 that ``_second_chance`` does not explain: the object ``info`` (from the
        same HEAD) holds exactly this version (same size, and its ``CHECKSUM_KEY`` is the MD5
        of this file). Such an object is this version, whoever wrote it — e.g. a peer that
        held a copy of it uploaded it while this node was down (docs/dev/peers.md): the entry
        becomes CLEAN at its ETag, with no second object and no conflict copy. Only on this
        rare path is the local file hashed."""
        stored = info.metadata.get(CHECKSUM_KEY)
        if stored is None or info.size != work.size or not info.etag:
            return False
        digest = hashlib.md5()
        if hash_range(work.fd, 0, work.size, digest) < work.size or \
                digest.hexdigest() != stored or not self.core.upload_source_current(work):
            return False
        log.info("%s: the object in the store already holds this version (same MD5); "
                 "nothing to upload", work.key)
        return True

    def _keep_conflict(self, work: UploadWork, send: Callable[[str, str | None, bool], str]
                       ) -> None:
        """Another writer replaced the object since this node uploaded or fetched it: its
        object stays, this version is uploaded as ``<key>.cistern-conflict-<UTC time>``
        (docs/dev/cachenode.md, Coherence). If that upload fails, its error propagates: the
        file stays DIRTY and the whole sequence runs again, so no version is ever lost."""
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        conflict_key = f"{work.key}.cistern-conflict-{stamp}"
        send(conflict_key, None, False)
        self.metrics.conflicts.inc()
        with self._lock:
            self.conflicts_total += 1
            self.last_conflict = f"{work.key} -> {conflict_key}"
            self.last_conflict_time = time.time()
        log.error("conflict: another writer replaced %s in the store; its object is kept and "
                  "this node's version was uploaded as %s", work.key, conflict_key)

    def _multipart(self, work: UploadWork, key: str, if_match: str | None,
                   if_none_match: bool) -> str:
        """A multipart upload of ``work`` to ``key`` (its own, or a conflict name), completed
        only if the conditions hold: ``If-None-Match: *`` on CompleteMultipartUpload for a new
        key; for an overwrite ``If-Match`` on it (which moto ignores) after a HEAD of the key
        just before, a narrowing guard (docs/dev/cachenode.md, Coherence: the race left)."""
        client = self.client
        upload_id = client.create_multipart(key, work.metadata)
        if key == work.key:  # (a conflict copy's upload id has no intent row to go in)
            self.core.set_upload_id(work, upload_id)
        part_size = part_size_for(work.size, self.policy.part_size)
        count = max(1, -(-work.size // part_size))
        futures: list[Future[str]] = []
        try:
            for number in range(1, count + 1):
                offset = (number - 1) * part_size
                length = min(part_size, work.size - offset)
                futures.append(self._parts.submit(client.upload_part, key, upload_id,
                                                  number, work.fd, offset, length))
            parts = [(n + 1, f.result()) for n, f in enumerate(futures)]
            if not self.core.upload_source_current(work):
                raise _SourceChanged(work.path)  # aborted below: no torn object
            if if_match is not None:
                client.check_etag(key, if_match)
            return client.complete_multipart(key, upload_id, parts, if_match=if_match,
                                             if_none_match=if_none_match)
        except BaseException:
            for f in futures:
                f.cancel()
            for f in futures:
                if not f.cancelled():
                    with contextlib.suppress(BaseException):  # aborted below either way
                        f.result()
            try:
                client.abort_multipart(key, upload_id)
            except StoreError as exc:
                log.warning("could not abort multipart upload of %s: %s", key, exc)
            raise

    def _move(self, work: MoveWork) -> None:
        error: Exception | None = None
        try:
            self.client.copy(work.src, work.dst, work.metadata)
            if work.src != work.dst:
                self.metrics.copies.inc()
        except (StoreError, FileNotFoundError) as exc:
            error = exc
            log.warning("copy of %s to %s failed, will retry: %s", work.src, work.dst, exc)
        self.core.finish_move(work, error)

    def _delete(self, work: DeleteWork) -> None:
        error: Exception | None = None
        try:
            self.client.delete(work.key)
            self.metrics.deletes.inc()
        except StoreError as exc:
            error = exc
            log.warning("delete of %s failed, will retry: %s", work.key, exc)
        self.core.finish_delete(work, error)

    # -------------------------------------------------------------- waiting

    def wait_idle(self, timeout: float, upto_seq: int | None = None) -> bool:
        """Wait until nothing (changed before ``upto_seq``) waits for the store."""
        return self.core.wait_idle(timeout, upto_seq)

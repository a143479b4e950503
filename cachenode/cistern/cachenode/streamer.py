"""The flusher's streaming uploads: parts of a file leave the node while it is written.

For each ``StreamWork`` the core hands out (core/streams.py) one thread runs ``_stream``:

1. CreateMultipartUpload; the upload id is journaled (invariant 3) before any part is sent.
2. While the file is open: every full part beyond the upload front is made durable locally
   (``fdatasync`` of the data file: a part in the store is never ahead of the local disk) and
   sent on the node's part pool, at most ``partsPerStream`` at a time per file.
3. Once the file is closed (at once, no ``uploadDelay``: its parts are in the store already;
   a file streamed under a predicted key must also have been renamed to it; commit markers
   still wait for it because it stays pending): ``fsync``, the tail is sent, then every part
   sent while the file was open is checked against the final content — the ``PartChecksum``
   fingerprint of its range now against the one in the part's receipt (of the bytes the store
   received and verified). A part rewritten behind the front is sent again under the same
   number. Then CompleteMultipartUpload.
4. A file truncated below the front, renamed, unlinked, or rewritten again while being checked
   is abandoned: the upload is aborted (no orphan), the core re-queues the file and it is
   uploaded again from the start. The object therefore never mixes contents.

The adaptive request rate in ``StoreClient`` paces every part: a 503 SlowDown halves the
node's request rate, successes raise it again, so streams slow down with everyone else.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

from cistern.cachenode.core import CacheCore, StreamWork, UploadWork
from cistern.cachenode.store import (
    MAX_PARTS,
    PermanentStoreError,
    PreconditionFailed,
    StoreError,
    part_fingerprint,
    receipt_fingerprint,
)
from cistern.cachenode.storeclient import StoreClient
from cistern.config import FlushPolicy

__all__ = ["StreamAbandoned", "Streamer"]

log = logging.getLogger(__name__)

POLL_SECONDS = 0.02
"""How often a stream looks at its file's size while it is written."""
PARTS_PER_STREAM = 4
"""Parts of one file in flight at once (the node-wide cap is ``maxConcurrentParts``)."""


def _as_upload(work: StreamWork, gen: int, size: int) -> UploadWork:
    """The finished stream as the upload it amounts to (generation and size at close)."""
    return UploadWork(ino=work.ino, key=work.key, gen=gen, fd=work.fd, size=size,
                      metadata=work.metadata, path=work.path)


class StreamAbandoned(Exception):
    """The file changed in a way its parts cannot follow; it is uploaded again."""


class Streamer:
    def __init__(self, core: CacheCore, client: StoreClient, policy: FlushPolicy,
                 parts: ThreadPoolExecutor) -> None:
        self.core = core
        self.client = client
        self.policy = policy
        self._parts = parts
        self._lock = threading.Lock()
        self._active = 0
        self.max_streams = policy.max_concurrent_uploads
        self.streams_completed = 0
        self.streams_abandoned = 0
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(self.max_streams, thread_name_prefix="stream")
        self._checks = ThreadPoolExecutor(2, thread_name_prefix="stream-check")
        """Checksums of parts sent early, against the final content (zlib releases the GIL)."""

    @property
    def active(self) -> int:
        with self._lock:
            return self._active

    def poll(self) -> int:
        """Start streams for files that have grown large; returns how many started."""
        free = self.max_streams - self.active
        if free <= 0 or self._stop.is_set():
            return 0
        works = self.core.collect_streams(free)
        with self._lock:
            self._active += len(works)
        for work in works:
            self._pool.submit(self._run, work)
        return len(works)

    def stop(self) -> None:
        self._stop.set()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._checks.shutdown(wait=True, cancel_futures=True)

    def _run(self, work: StreamWork) -> None:
        try:
            self._stream(work)
        except Exception:  # a bug must not kill the pool thread silently
            log.exception("stream of %s failed", work.path)
        finally:
            os.close(work.fd)
            with self._lock:
                self._active -= 1

    # -------------------------------------------------------------- one stream

    def _stream(self, work: StreamWork) -> None:
        client = self.client
        try:
            # Power-loss rule (as for every upload): the intent is durable before the
            # multipart upload exists, so a restart after a crash aborts it.
            self.core.sync_journal()
            upload_id = client.create_multipart(work.key, work.metadata)
        except (StoreError, OSError) as exc:
            self.core.finish_stream(work, -1, 0, None, exc)
            return
        self.core.set_upload_id(work, upload_id)
        log.debug("streaming %s (upload %s)", work.path, upload_id)
        sent: dict[int, Future[str]] = {}
        try:
            gen, size = self._send_while_open(work, upload_id, sent)
            etag = self._finish_parts(work, upload_id, sent, gen, size)
        except (StoreError, OSError, StreamAbandoned) as exc:
            if self._stop.is_set():
                # Stopping: leave the journaled intent and upload id; the next start aborts
                # the upload and uploads the file again (recovery._recover_upload).
                return
            self._abort(work, upload_id, sent)
            with self._lock:
                self.streams_abandoned += 1
            if not isinstance(exc, StreamAbandoned):
                if not isinstance(exc, StoreError):
                    client.errors.add(f"stream {work.key}", exc)
                level = logging.ERROR if isinstance(exc, PermanentStoreError) \
                    else logging.WARNING
                log.log(level, "streamed upload of %s failed, will upload again: %s",
                        work.path, exc)
            else:
                log.info("stream of %s abandoned, uploading it again: %s", work.path, exc)
            self.core.finish_stream(work, -1, 0, None, exc)
            return
        with self._lock:
            self.streams_completed += 1
        self.core.finish_stream(work, gen, size, etag, None)

    def _part_range(self, number: int, size: int) -> tuple[int, int]:
        offset = (number - 1) * self.policy.part_size
        return offset, min(self.policy.part_size, size - offset)

    def _send(self, work: StreamWork, upload_id: str, number: int, size: int,
              sent: dict[int, Future[str]]) -> None:
        offset, length = self._part_range(number, size)
        sent[number] = self._parts.submit(self.client.upload_part, work.key, upload_id,
                                          number, work.fd, offset, length)

    def _send_while_open(self, work: StreamWork, upload_id: str,
                         sent: dict[int, Future[str]]) -> tuple[int, int]:
        """Send full parts as they fill; return (generation, size) once closed."""
        part = self.policy.part_size
        front = 0  # bytes covered by parts handed to the pool
        synced = 0  # bytes written before the last fdatasync returned: durable locally
        while True:
            if self._stop.is_set():
                raise StreamAbandoned("the node is stopping")
            state = self.core.stream_state(work, self._done_bytes(sent, front))
            if state.gone:
                raise StreamAbandoned("renamed, unlinked or no longer dirty")
            if state.size < front:
                raise StreamAbandoned(f"truncated to {state.size} below the upload front "
                                      f"{front}")
            if state.closed:
                return state.gen, state.size
            ready = (state.written - front) // part
            in_flight = sum(1 for f in sent.values() if not f.done())
            room = PARTS_PER_STREAM - in_flight
            if ready > 0 and room > 0 and len(sent) + 1 < MAX_PARTS:
                # The power-loss rule: a part in the store is never ahead of the local disk.
                # One fdatasync covers everything written before it (``state.written`` was
                # read before it), so a writer far ahead of the front costs one sync for many
                # parts, not one per batch: fewer syncs land while it is still writing.
                count = min(ready, room)
                if front + count * part > synced:
                    os.fdatasync(work.fd)
                    synced = state.written
                for _ in range(count):
                    number = front // part + 1
                    self._send(work, upload_id, number, front + part, sent)
                    front += part
            for f in sent.values():
                if f.done() and f.exception() is not None:
                    raise f.exception()  # type: ignore[misc]
            self._stop.wait(POLL_SECONDS)

    def _done_bytes(self, sent: dict[int, Future[str]], front: int) -> int:
        """Bytes in parts the store has acknowledged (all full parts while the file is open)."""
        done = sum(1 for f in sent.values()
                   if f.done() and not f.cancelled() and f.exception() is None)
        return min(front, done * self.policy.part_size)

    def _finish_parts(self, work: StreamWork, upload_id: str, sent: dict[int, Future[str]],
                      gen: int, size: int) -> str:
        """Send the tail, check every early part against the final content, complete."""
        part = self.policy.part_size
        started = time.monotonic()
        final = _as_upload(work, gen, size)
        # The final content and its size are durable (data file, directory, journal) before
        # the tail leaves; False if the file was opened for writing again meanwhile.
        if not self.core.prepare_upload(final):
            raise StreamAbandoned("opened for writing again after close")
        early = set(sent)
        log.debug("%s closed: %d bytes, %d parts sent early (%d acknowledged)", work.path,
                  size, len(early), sum(1 for f in sent.values() if f.done()))
        count = -(-size // part)
        if count == 0:
            raise StreamAbandoned("truncated to nothing")  # uploaded again as an empty PUT
        if count > MAX_PARTS:
            raise StreamAbandoned(f"{size} bytes need more than {MAX_PARTS} parts")
        if len(sent) > count:
            raise StreamAbandoned("shrank below a part already sent")
        # Parts sent while the file was open: their bytes must be the final bytes. Their
        # checksums are computed now, while the tail and the last early parts are uploading.
        final_sums = {n: self._checks.submit(part_fingerprint, work.fd,
                                             *self._part_range(n, size)) for n in sorted(early)}
        for number in range(1, count + 1):
            if number not in sent:
                self._send(work, upload_id, number, size, sent)
        etags = {n: f.result() for n, f in sent.items()}
        sent_at = time.monotonic()
        for number in sorted(early):
            if receipt_fingerprint(etags[number]) != final_sums[number].result():
                log.info("part %d of %s changed after it was sent: sending it again",
                         number, work.path)
                self._send(work, upload_id, number, size, sent)
                etags[number] = sent[number].result()
        log.debug("%s: parts acknowledged after %.2fs, checked after %.2fs", work.path,
                  sent_at - started, time.monotonic() - started)
        state = self.core.stream_state(work, size)
        if state.gone or state.gen != gen or not state.closed or state.size != size \
                or not self.core.upload_source_current(final):
            raise StreamAbandoned("written again while its parts were checked")
        # Coherence (pc, issue 15): conditional like any upload. On a failed precondition
        # the stream is abandoned; the file, closed by now, is uploaded again by the flusher,
        # whose conditional upload keeps this version as a conflict copy.
        try:
            if work.if_match is not None:
                self.client.check_etag(work.key, work.if_match)
            sending = time.monotonic()
            etag = self.client.complete_multipart(work.key, upload_id, sorted(etags.items()),
                                                if_match=work.if_match,
                                                if_none_match=work.if_none_match)
            # The split the bench reports (acked / completed): the Complete's round trip is
            # the store's (moto concatenates the parts: ~2.7 ms per MiB, bench.upload_path).
            log.debug("%s: Complete sent %.3fs after close, returned after %.3fs", work.path,
                      sending - started, time.monotonic() - sending)
            return etag
        except PreconditionFailed as exc:
            raise StreamAbandoned(f"{exc}; uploaded again, conditionally") from exc

    def _abort(self, work: StreamWork, upload_id: str, sent: dict[int, Future[str]]) -> None:
        for f in sent.values():
            f.cancel()
        for f in sent.values():
            if not f.cancelled():
                with contextlib.suppress(BaseException):  # aborted below either way
                    f.result()
        try:
            self.client.abort_multipart(work.key, upload_id)
        except StoreError as exc:
            log.warning("could not abort multipart upload of %s: %s", work.key, exc)

"""The /dev/fuse front end for kernels without FUSE passthrough: file data stays out of Python.

On kernels before 6.9 (or built without ``CONFIG_FUSE_PASSTHROUGH``) every byte an application
writes travels through the daemon. This front end keeps that cheap:

* **splice**: each worker reads requests from /dev/fuse into its own pipe (``splice(2)``; for a
  WRITE the kernel puts references to the request's pages in the pipe), reads the headers
  from the pipe and splices the payload into the cache's data file: one copy, in the kernel,
  none through a Python buffer. Other requests are read from the pipe into the worker's
  buffer. READ replies are ``preadv`` into the worker's buffer + ``writev``;
* the largest requests the pipe allows (``FUSE_MAX_PAGES``: 255 pages, 256 with
  CAP_SYS_RESOURCE), and several worker threads (``kernel_frontend``'s leader/followers loop);
* optionally the kernel's **write-back cache** (``FUSE_WRITEBACK_CACHE``, ``writeback_cache``):
  ``write(2)`` returns once the data is in the page cache and the kernel sends WRITEs later.
  Off by default: measured, it gains no bandwidth (the FUSE BDI's strict dirty limit throttles
  writers to the daemon's pace) and costs p99 latency, and the kernel then ignores file sizes
  the daemon reports, so a file another writer changed in the bucket would keep its old size
  (docs/dev/splice.md has the figures and the durability argument for both modes).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import threading
from typing import Any

from cistern.cachenode import kernel_fuse as kf
from cistern.cachenode.holder import TakeoverError
from cistern.cachenode.kernel_frontend import KernelFrontend

__all__ = ["SpliceFrontend"]

log = logging.getLogger(__name__)

#: A WRITE whose payload is at least this long stays in the pipe and is spliced to the file;
#: smaller ones are read into the worker's buffer with their header (one system call fewer).
SPLICE_MIN = 16 * 1024
_HEAD = kf.IN_HEADER.size + kf.WRITE_IN.size
#: The pipe holds a whole request: one slot per page of a WRITE, plus one for its header. A
#: 1 MiB WRITE needs a 2 MiB pipe, which takes CAP_SYS_RESOURCE above /proc/sys/fs/pipe-max-size
#: (1 MiB by default); without it WRITEs are one page shorter than 1 MiB (``max_pages`` 255).
PIPE_SIZE = 2 << 20


def pipe_capacity() -> int:
    """The largest pipe this process can make, up to ``PIPE_SIZE`` (bytes)."""
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        size = PIPE_SIZE
        while size > kf.PAGE_SIZE:
            try:
                return int(fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, size))
            except OSError:
                size //= 2
        return size
    finally:
        os.close(r)
        os.close(w)


class _Pipe:
    """One worker's pipe, and how many payload bytes of the current WRITE are still in it."""

    __slots__ = ("pending", "r", "w")

    def __init__(self, size: int) -> None:
        self.r, self.w = os.pipe2(os.O_CLOEXEC)
        self.pending = 0
        try:
            fcntl.fcntl(self.w, fcntl.F_SETPIPE_SZ, size)
        except OSError:
            self.close()
            raise

    def close(self) -> None:
        os.close(self.r)
        os.close(self.w)


class SpliceFrontend(KernelFrontend):
    """FUSE front end on /dev/fuse with the kernel's write-back cache and spliced data.

    ``writeback_cache`` and ``splice_writes`` exist to measure the alternatives
    (docs/dev/splice.md); the daemon runs with splice on and the write-back cache off.
    """

    name = "splice"

    def __init__(self, *, writeback_cache: bool = False, splice_writes: bool = True,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.writeback_cache = writeback_cache
        self.splice_writes = splice_writes
        self._local = threading.local()
        self._pipes: list[_Pipe] = []
        self._pipes_lock = threading.Lock()
        self._pipe_size = pipe_capacity() if splice_writes else 0
        #: Pages of the largest READ/WRITE: a spliced WRITE must fit in the pipe.
        self.max_pages = min(kf.MAX_PAGES, self._pipe_size // kf.PAGE_SIZE - 1) \
            if splice_writes else kf.MAX_PAGES
        self.spliced_writes = 0
        self.copied_writes = 0
        if writeback_cache:
            # The kernel appends itself (it knows the size of its cached file): an offset
            # from it is final, and the core must not move it to the data file's end.
            self._open_mask = ~os.O_APPEND

    def _negotiate(self) -> kf.InitResult:
        init = kf.negotiate_init(self._devfd, want_passthrough=False,
                                 want_writeback_cache=self.writeback_cache,
                                 max_pages=self.max_pages)
        if self.writeback_cache and not init.flags & kf.FUSE_WRITEBACK_CACHE:
            log.warning("the kernel did not offer FUSE_WRITEBACK_CACHE on %s: every write(2) "
                        "waits for the daemon", self._mountpoint)
            self._open_mask = -1
        return init

    def _check_session(self, init: kf.InitResult) -> None:
        if init.passthrough:
            raise TakeoverError("the held connection was negotiated with passthrough")
        self.writeback_cache = bool(init.flags & kf.FUSE_WRITEBACK_CACHE)
        self._open_mask = ~os.O_APPEND if self.writeback_cache else -1

    def _open_reply(self, handle: Any) -> tuple[int, int]:
        if handle.fd is None or handle.fd < 0:
            self.direct_io_opens += 1
            return kf.FOPEN_DIRECT_IO, 0
        # In write-back mode close(2) has nothing to wait for: no FLUSH round trip, and a
        # close (a forked child closing inherited descriptors) never waits for a daemon that
        # is restarting. With the kernel's write-back cache the kernel still writes dirty
        # pages back on close; only the FLUSH request is spared.
        return self._noflush, 0

    def _status_extra(self) -> dict[str, Any]:
        return {"writebackCache": self.writeback_cache, "maxPages": self.max_pages,
                "splicedWrites": self.spliced_writes,
                "copiedWrites": self.copied_writes}

    def _release_backings(self, *, close: bool) -> None:
        if any(worker.is_alive() for worker in self._workers):
            return  # a worker may still splice through its pipe; they end with the process
        with self._pipes_lock:
            pipes, self._pipes = self._pipes, []
        for pipe in pipes:
            pipe.close()

    # --- reading requests -------------------------------------------------------------------
    def _receiver(self, buf: bytearray) -> Any:
        if not self.splice_writes:
            return super()._receiver(buf)
        try:
            pipe = _Pipe(self._pipe_size)
        except OSError as exc:
            log.warning("a %d-byte pipe for splicing /dev/fuse of %s: %s; copying instead",
                        self._pipe_size, self._mountpoint, exc)
            return super()._receiver(buf)
        with self._pipes_lock:
            self._pipes.append(pipe)
        self._local.pipe = pipe
        devfd, pipe_r, pipe_w = self._devfd, pipe.r, pipe.w
        view = memoryview(buf)
        splice, readv = os.splice, os.readv
        nonblock = os.SPLICE_F_NONBLOCK
        size = len(buf)
        write_opcode = kf.WRITE
        unpack_opcode = kf.IN_HEADER.unpack_from

        def receive() -> int:
            if pipe.pending:  # a WRITE that failed before its payload was consumed
                self._drain(pipe, view)
            n = splice(devfd, pipe_w, size, flags=nonblock)
            if n < SPLICE_MIN + _HEAD:
                return _read_full(readv, pipe_r, view, 0, n)
            _read_full(readv, pipe_r, view, 0, _HEAD)
            if unpack_opcode(buf, 0)[1] == write_opcode:
                pipe.pending = n - _HEAD
                return _HEAD
            return _read_full(readv, pipe_r, view, _HEAD, n)

        return receive

    @staticmethod
    def _drain(pipe: _Pipe, view: memoryview) -> None:
        while pipe.pending:
            got = os.readv(pipe.r, [view[:min(pipe.pending, len(view))]])
            if got <= 0:
                raise OSError(errno.EIO, "the /dev/fuse pipe ended early")
            pipe.pending -= got

    # --- data -------------------------------------------------------------------------------
    def _write(self, nodeid: int, uid: int, gid: int, pid: int, body: memoryview) -> bytes:
        fh, offset, size, *_ = kf.WRITE_IN.unpack_from(body, 0)
        handle = self._handle(fh)
        pipe: _Pipe | None = getattr(self._local, "pipe", None)
        if pipe is not None and pipe.pending:
            if pipe.pending != size:
                raise OSError(errno.EIO, f"WRITE of {size} bytes with {pipe.pending} in the pipe")
            written = self._core.write_with(handle, offset, size,
                                            lambda fd, at: _splice_to(pipe, fd, at))
            self.spliced_writes += 1
            return kf.WRITE_OUT.pack(written, 0)
        data = body[kf.WRITE_IN.size:kf.WRITE_IN.size + size]
        written = self._core.write_with(handle, offset, size,
                                        lambda fd, at: os.pwrite(fd, data, at))
        self.copied_writes += 1
        return kf.WRITE_OUT.pack(written, 0)

    def _read(self, nodeid: int, uid: int, gid: int, pid: int, body: memoryview) -> Any:
        fh, offset, size, *_ = kf.READ_IN.unpack_from(body, 0)
        handle = self._handle(fh)
        if handle.fd is None or handle.fd < 0:
            return bytes(self._core.read(handle, offset, size))
        out: bytearray | None = getattr(self._local, "out", None)
        if out is None or len(out) < size:
            out = self._local.out = bytearray(max(size, kf.MAX_WRITE))
        view = memoryview(out)
        got = os.preadv(handle.fd, [view[:size]], offset)
        return view[:got]


def _read_full(readv: Any, fd: int, view: memoryview, start: int, end: int) -> int:
    """Read bytes ``start:end`` of ``view`` from the pipe ``fd``; returns ``end``."""
    while start < end:
        got = readv(fd, [view[start:end]])
        if got <= 0:
            raise OSError(errno.EIO, "the /dev/fuse pipe ended early")
        start += got
    return end


def _splice_to(pipe: _Pipe, fd: int, offset: int) -> int:
    """Move the payload waiting in ``pipe`` to ``fd`` at ``offset``; returns its length."""
    done = 0
    while pipe.pending:
        moved = os.splice(pipe.r, fd, pipe.pending, offset_dst=offset + done)
        if moved <= 0:
            raise OSError(errno.EIO, "splicing a WRITE into the data file stopped short")
        pipe.pending -= moved
        done += moved
    return done

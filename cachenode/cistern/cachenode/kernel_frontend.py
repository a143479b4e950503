"""The shared base of the /dev/fuse front ends: request loop, lifecycle and file handles.

``KernelFrontend`` speaks the kernel FUSE protocol (``kernel_fuse``) on /dev/fuse without
libfuse and translates requests into ``CacheCore`` calls and exceptions into errno (the one
error boundary of these front ends):

* every request is answered exactly once (EIO as a last resort), except FORGET,
  BATCH_FORGET and INTERRUPT, which take no answer. A reply the kernel refuses with ENOENT
  (the caller was interrupted) is rolled back: the lookup is forgotten, the handle released;
* file handles are slots of the session file (``fuse_session``), so a holder can keep the
  connection across daemon restarts and the next daemon rebuilds them (``takeover``);
* metadata requests are in ``kernel_requests``.

Subclasses say how file data moves: ``fuse_passthrough`` (the kernel reads and writes backing
files itself) and ``fuse_splice`` (the kernel's page cache in write-back mode, data moved
between /dev/fuse and the data files with splice). They choose the INIT flags
(``_negotiate``) and the open flags of each handle (``_open_reply``).

The per-request path is kept lean: precompiled structs, one preallocated read buffer per
worker thread, a dispatch table indexed by opcode, no logging unless something fails.
See docs/dev/passthrough.md for the protocol facts and invariants.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import select
import threading
import time
from collections.abc import Callable
from typing import Any

from cistern.cachenode import kernel_fuse as kf
from cistern.cachenode.fuse_session import SessionFile
from cistern.cachenode.kernel_requests import (
    DIR_FH,
    DirHandle,
    MetadataHandlers,
    name_at,
    split_timeout,
)
from cistern.cachenode.takeover import Handler, TakeoverHandling

__all__ = ["KernelFrontend"]

log = logging.getLogger(__name__)

_EMPTY = b""


class KernelFrontend(MetadataHandlers, TakeoverHandling):
    """FUSE front end on /dev/fuse (see the module docstring).

    ``mount`` mounts and negotiates INIT, ``serve`` answers requests on a pool of threads
    until ``request_stop`` or an external unmount, ``close`` unmounts.
    """

    name = "kernel"

    def __init__(self, *, threads: int = 8, attr_timeout: float = 1.0,
                 entry_timeout: float = 1.0, negative_timeout: float = 1.0,
                 stop_grace: float = 2.0, spin: float = 100e-6) -> None:
        self.threads = max(1, threads)
        #: Seconds the reading thread keeps polling /dev/fuse after a request before it
        #: sleeps in poll(2): a burst of small-file requests then costs no wake-up each.
        #: 0 turns it off; the CPU spent is bounded by ``spin`` per idle gap.
        self.spin = spin
        self.stop_grace = stop_grace
        self._attr_valid = split_timeout(attr_timeout)
        self._entry_valid = split_timeout(entry_timeout)
        self._negative_valid = split_timeout(negative_timeout)
        entry_s, entry_ns = self._negative_valid
        self._negative_entry = kf.ENTRY_OUT.pack(0, 0, entry_s, 0, entry_ns, 0, *([0] * 16))
        self._core: Any = None
        self._mountpoint = ""
        self._devfd = -1
        self.init: kf.InitResult | None = None
        self._mounted = False
        self._stop = threading.Event()
        self._workers: list[threading.Thread] = []
        self._handles: dict[int, Any] = {}
        self._dirs: dict[int, DirHandle] = {}
        self._dir_fh = itertools.count(DIR_FH + (1 << 32))
        self._session: SessionFile | None = None
        #: The connection is also held by a holder (holder.py): stopping must leave it alive.
        self.held = False
        #: Takeover bookkeeping: handles of a dead daemon whose file is gone (answered as
        #: no-ops), OPEN/CREATE requests of the dead daemon whose reply may not have arrived
        #: (unique -> fh), and when the previous daemon ended.
        self._ghosts: set[int] = set()
        self._unanswered: dict[int, int] = {}
        self._detached_at: float | None = None
        self.last_pause: float | None = None
        self.resent = 0
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._fatal: BaseException | None = None
        # counters for status / metrics (plain ints, updated under the GIL); ``errors`` counts
        # requests answered EIO (lost data or a bug), not ordinary errno answers
        self.requests = 0
        self.errors = 0
        self.direct_io_opens = 0
        self._handlers: list[Handler | None] = [None] * 64
        for opcode, handler in {
            kf.LOOKUP: self._lookup, kf.GETATTR: self._getattr, kf.SETATTR: self._setattr,
            kf.MKNOD: self._mknod, kf.MKDIR: self._mkdir, kf.UNLINK: self._unlink,
            kf.RMDIR: self._rmdir, kf.RENAME: self._rename, kf.RENAME2: self._rename2,
            kf.OPEN: self._open, kf.READ: self._read, kf.WRITE: self._write,
            kf.STATFS: self._statfs, kf.RELEASE: self._release, kf.FSYNC: self._fsync,
            kf.FLUSH: self._flush, kf.OPENDIR: self._opendir, kf.READDIR: self._readdir,
            kf.RELEASEDIR: self._releasedir, kf.FSYNCDIR: self._fsyncdir,
            kf.CREATE: self._create, kf.FALLOCATE: self._fallocate,
            kf.SYMLINK: self._symlink, kf.LINK: self._link, kf.DESTROY: self._destroy,
        }.items():
            self._handlers[opcode] = handler
        # Requests that may block (S3 listing or fetch, fsync, backpressure, an upload in
        # write-through mode): their thread hands the reading role to an idle one first.
        self._may_block = [True] * 64
        for opcode in (kf.GETATTR, kf.RELEASE, kf.RELEASEDIR, kf.READDIR, kf.STATFS,
                       kf.FORGET, kf.BATCH_FORGET, kf.INTERRUPT, kf.DESTROY, kf.FLUSH):
            self._may_block[opcode] = False
        for opcode in range(64):
            if self._handlers[opcode] is None and opcode not in (kf.FORGET, kf.BATCH_FORGET):
                self._may_block[opcode] = False  # answered ENOSYS at once
        self._read_token = threading.Lock()  # released by whichever thread passes it on
        # Requests that may block, but usually do not: a hint from the core (node id -> bool)
        # says when they can be answered inline, sparing a thread hand-off per request.
        self._quick: list[Callable[[int], bool] | None] = [None] * 64
        self._noflush = 0
        #: Open flags the core must not see (the write-back cache handles O_APPEND itself).
        self._open_mask = -1

    # --- lifecycle ----------------------------------------------------------------------------
    def _bind(self, core: Any, mountpoint: str) -> None:
        self._core = core
        self._mountpoint = os.path.abspath(mountpoint)
        self._quick[kf.LOOKUP] = core.listing_ready
        self._quick[kf.MKDIR] = core.listing_ready
        self._quick[kf.CREATE] = lambda ino: core.listing_ready(ino) and core.admits_now()
        self._quick[kf.OPEN] = lambda ino: core.is_local(ino) and core.admits_now()
        policy = getattr(core, "flush_policy", None)
        if getattr(policy, "mode", None) == "writeBack":
            # close(2) has nothing to wait for: spare the kernel the FLUSH round trip.
            self._noflush = kf.FOPEN_NOFLUSH
        else:
            self._may_block[kf.FLUSH] = True

    def mount(self, core: Any, mountpoint: str, *, allow_other: bool, fsname: str) -> None:
        self._bind(core, mountpoint)
        self._devfd = kf.open_fuse_device()
        try:
            kf.mount_fuse(self._devfd, self._mountpoint, fsname=fsname, allow_other=allow_other)
            self._mounted = True
            self.init = self._negotiate()
            self._session = SessionFile.create(self.init)
        except BaseException:
            self._teardown()
            raise
        self._dir_fh = itertools.count(DIR_FH | (self._session.epoch & 0x3FFFFFFF) << 32)
        log.info("mounted %s on %s with the %s front end (kernel protocol 7.%d)",
                 fsname, self._mountpoint, self.name, self.init.kernel_minor)

    def _negotiate(self) -> kf.InitResult:
        """Answer INIT on ``self._devfd``; raise when this front end cannot run here."""
        raise NotImplementedError

    def _open_reply(self, handle: Any) -> tuple[int, int]:
        """FOPEN_* flags and backing id (0: none) for a new handle."""
        raise NotImplementedError

    def _drop_backing(self, handle: Any) -> None:
        """A handle is going away: release what ``_open_reply`` took for it."""

    def _release_backings(self, *, close: bool) -> None:
        """The connection ends (``close``) or is handed to the holder: drop per-inode state."""

    def _idle(self) -> None:
        """The reading thread waited a second without a request: housekeeping goes here."""

    def _status_extra(self) -> dict[str, Any]:
        return {}

    def serve(self) -> None:
        """Answer kernel requests until ``request_stop`` or an external unmount."""
        if self._devfd < 0:
            raise RuntimeError("serve() before mount()")
        if self._detached_at is not None:
            self.last_pause = time.monotonic() - self._detached_at
            log.info("serving %s again after %.3fs without a daemon", self._mountpoint,
                     self.last_pause)
        os.set_blocking(self._devfd, False)
        for index in range(self.threads):
            worker = threading.Thread(target=self._worker, name=f"fuse-{self.name}-{index}",
                                      daemon=True)
            worker.start()
            self._workers.append(worker)
        while not self._stop.is_set() and any(w.is_alive() for w in self._workers):
            self._stop.wait(0.5)
        deadline = time.monotonic() + self.stop_grace
        for worker in self._workers:
            worker.join(max(0.0, deadline - time.monotonic()))
        if self._fatal is not None:
            raise RuntimeError(f"FUSE {self.name} worker failed") from self._fatal

    def request_stop(self) -> None:
        """Ask ``serve`` to return: the mount is detached, the kernel then ends the session.
        A held connection (``held``) stays mounted: requests wait for the next daemon.

        Safe from signal handlers and other threads.
        """
        self._stop.set()
        if self.held:
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"x")
            return
        if self._mounted:
            self._mounted = False
            try:
                kf.unmount(self._mountpoint)
            except OSError as exc:
                log.warning("unmounting %s failed: %s", self._mountpoint, exc)

    def close(self) -> None:
        """Unmount (if still mounted) and release every backing id and handle we hold."""
        self._stop.set()
        self._teardown()

    def _teardown(self) -> None:
        if self.held:
            # The holder keeps the connection; its backing ids serve open files and the next
            # daemon, and the session file records them.
            self._release_backings(close=False)
            if self._devfd >= 0 and not any(w.is_alive() for w in self._workers):
                os.close(self._devfd)
                self._devfd = -1
            return
        if self._mounted:
            self._mounted = False
            with contextlib.suppress(OSError):
                kf.unmount(self._mountpoint)
        self._release_backings(close=True)
        if self._devfd >= 0 and not any(w.is_alive() for w in self._workers):
            os.close(self._devfd)
            self._devfd = -1
            if self._session is not None:
                self._session.close()
                self._session = None

    def status(self) -> dict[str, Any]:
        """What /status and /metrics report about this front end."""
        return {
            "frontend": self.name,
            "kernelProtocol": f"7.{self.init.kernel_minor}" if self.init else None,
            "passthrough": bool(self.init and self.init.passthrough),
            "requests": self.requests,
            "errors": self.errors,
            "directIoOpens": self.direct_io_opens,
            "held": self.held,
            "takeovers": self._session.takeovers if self._session else 0,
            "lastTakeoverPauseSeconds": self.last_pause,
            "resentRequests": self.resent,
            **self._status_extra(),
        }

    # --- the request loop ---------------------------------------------------------------------
    def _worker(self) -> None:
        """Leader/followers: one thread at a time reads /dev/fuse and answers what cannot block
        inline; before a request that may block it passes the reading role on (``_read_token``),
        so slow requests never hold up the others and fast ones cost no thread hand-off.
        """
        devfd = self._devfd
        buf = bytearray(kf.read_buffer_size())
        view = memoryview(buf)
        handlers = self._handlers
        may_block = self._may_block
        quick = self._quick
        token = self._read_token
        unpack_header = kf.IN_HEADER.unpack_from
        pack_out = kf.OUT_HEADER.pack
        writev = os.writev
        clock = time.monotonic_ns
        spin_ns = int(self.spin * 1e9)
        receive = self._receiver(buf)
        poller = select.poll()
        poller.register(devfd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        stop = self._stop
        session = self._session
        last = 0
        # Runs until the kernel ends the session (ENODEV): after request_stop the mount is
        # detached, but files still open on it are served until they are closed.
        while True:
            token.acquire()
            leading = True
            while leading:
                if stop.is_set() and self.held:
                    # Handing off: what is still queued waits for the next daemon.
                    token.release()
                    return
                try:
                    got = receive()
                except BlockingIOError:
                    # Nothing queued. Right after a request another one usually follows (a
                    # cp -r sends four per file): poll for ``spin`` seconds before sleeping,
                    # since waking a sleeping thread costs more than the request itself.
                    if clock() - last > spin_ns:
                        if not poller.poll(1000):
                            self._idle()  # a second without requests
                        last = clock()
                    continue
                except InterruptedError:
                    continue
                except OSError as exc:
                    if exc.errno == errno.ENOENT:
                        continue  # interrupted before we read it
                    if exc.errno != errno.ENODEV:  # ENODEV: unmounted, the session is over
                        log.error("reading /dev/fuse for %s failed: %s", self._mountpoint, exc)
                    self._stop.set()
                    token.release()  # the next thread sees ENODEV too and leaves
                    return
                length, opcode, unique, nodeid, uid, gid, pid, extlen, _ = unpack_header(buf, 0)
                last = clock()
                self.requests += 1
                resent = unique >> 63
                if resent:
                    self._on_resent(opcode, unique)
                if opcode >= 64:
                    self._reply_error(unique, errno.ENOSYS)
                    continue
                # ``got`` < ``length``: the rest (a WRITE's data) waits in the worker's pipe
                body = view[kf.IN_HEADER.size:length - extlen * 8 if got >= length else got]
                if may_block[opcode]:
                    hint = quick[opcode]
                    try:
                        inline = hint is not None and hint(nodeid)
                    except Exception:  # a hint must never cost the reading thread
                        inline = False
                    if not inline:
                        # Copy the request out of the buffer the next reader will overwrite.
                        body = memoryview(bytes(body))
                        token.release()
                        leading = False
                handler = handlers[opcode]
                if handler is None:
                    if opcode == kf.FORGET:
                        self._forget(nodeid, body)
                    elif opcode == kf.BATCH_FORGET:
                        self._batch_forget(body)
                    elif opcode not in kf.NO_REPLY_OPCODES:
                        self._reply_error(unique, errno.ENOSYS)
                    continue
                try:
                    if resent:
                        payload = self._call_resent(opcode, handler, nodeid, uid, gid, pid,
                                                    body)
                    else:
                        payload = handler(nodeid, uid, gid, pid, body)
                except OSError as exc:
                    err = exc.errno or errno.EIO
                    if err == errno.EIO:
                        self.errors += 1
                    self._reply_error(unique, err)
                    continue
                except Exception:
                    self.errors += 1
                    log.exception("FUSE %s on %s (node %d) failed; answering EIO",
                                  kf.OPCODE_NAMES.get(opcode, opcode), self._mountpoint, nodeid)
                    self._reply_error(unique, errno.EIO)
                    continue
                if type(payload) is tuple:  # (payload, rollback) to undo if the kernel refuses
                    if len(payload) == 3:  # OPEN/CREATE: (payload, rollback, file handle)
                        payload, rollback, fh = payload
                        session.confirm(fh, unique)  # type: ignore[union-attr]
                    else:
                        payload, rollback = payload
                else:
                    rollback = None
                try:
                    writev(devfd, [pack_out(16 + len(payload), 0, unique), payload])
                except OSError as exc:
                    if rollback is not None:
                        rollback()
                    if exc.errno not in (errno.ENOENT, errno.ENODEV):
                        log.error("replying to FUSE %s on %s failed: %s",
                                  kf.OPCODE_NAMES.get(opcode, opcode), self._mountpoint, exc)

    def _receiver(self, buf: bytearray) -> Callable[[], int]:
        """The calling worker's way to read one request into ``buf`` (non-blocking); returns
        the bytes now in ``buf``."""
        devfd = self._devfd
        readv = os.readv
        return lambda: readv(devfd, [buf])

    def _reply_error(self, unique: int, err: int) -> None:
        try:
            os.write(self._devfd, kf.OUT_HEADER.pack(16, -err, unique))
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENODEV):
                log.error("replying to FUSE request on %s failed: %s", self._mountpoint, exc)

    # --- files --------------------------------------------------------------------------------
    def _register(self, handle: Any, open_flags: int, backing_id: int) -> int:
        """Record a handle in the session file; the slot number is the kernel's file handle."""
        assert self._session is not None
        try:
            fh = self._session.reserve(handle.ino, handle.flags, backing_id,
                                       bool(open_flags & kf.FOPEN_PASSTHROUGH))
        except BaseException:
            self._drop_backing(handle)
            raise
        self._handles[fh] = handle
        return fh

    def _forget_handle(self, fh: int) -> None:
        handle = self._handles.pop(fh, None)
        if self._session is not None:
            self._session.free(fh)
        if handle is not None:
            self._drop_backing(handle)
            self._core.release(handle)

    def _open(self, nodeid: int, uid: int, gid: int, pid: int, body: memoryview) -> Any:
        flags, _ = kf.OPEN_IN.unpack_from(body, 0)
        handle = self._core.open(nodeid, flags & self._open_mask)
        try:
            open_flags, backing_id = self._open_reply(handle)
            fh = self._register(handle, open_flags, backing_id)
        except BaseException:
            self._core.release(handle)
            raise
        return (kf.OPEN_OUT.pack(fh, open_flags, backing_id),
                lambda: self._forget_handle(fh), fh)

    def _create(self, nodeid: int, uid: int, gid: int, pid: int, body: memoryview) -> Any:
        flags, mode, _umask, _ = kf.CREATE_IN.unpack_from(body, 0)
        handle, attr = self._core.create(nodeid, name_at(body, kf.CREATE_IN.size), mode,
                                         flags & self._open_mask, uid, gid)
        return self._created(handle, attr)

    def _created(self, handle: Any, attr: Any) -> Any:
        try:
            open_flags, backing_id = self._open_reply(handle)
            fh = self._register(handle, open_flags, backing_id)
        except BaseException:
            self._core.release(handle)
            self._core.forget(attr.ino, 1)
            raise
        core = self._core

        def rollback() -> None:
            self._forget_handle(fh)
            core.forget(attr.ino, 1)

        return self._entry(attr) + kf.OPEN_OUT.pack(fh, open_flags, backing_id), rollback, fh

    def _handle(self, fh: int) -> Any:
        handle = self._handles.get(fh)
        if handle is None:
            raise OSError(errno.EBADF, "unknown file handle")
        return handle

    def _read(self, nodeid: int, uid: int, gid: int, pid: int, body: memoryview) -> bytes:
        fh, offset, size, *_ = kf.READ_IN.unpack_from(body, 0)
        return bytes(self._core.read(self._handle(fh), offset, size))

    def _write(self, nodeid: int, uid: int, gid: int, pid: int, body: memoryview) -> bytes:
        fh, offset, size, *_ = kf.WRITE_IN.unpack_from(body, 0)
        start = kf.WRITE_IN.size
        data = bytes(body[start:start + size])
        written = self._core.write(self._handle(fh), offset, data)
        return kf.WRITE_OUT.pack(written, 0)

    def _flush(self, nodeid: int, uid: int, gid: int, pid: int, body: memoryview) -> bytes:
        (fh, *_) = kf.FLUSH_IN.unpack_from(body, 0)
        if fh in self._ghosts:
            return _EMPTY
        self._core.flush(self._handle(fh))
        return _EMPTY

    def _release(self, nodeid: int, uid: int, gid: int, pid: int, body: memoryview) -> bytes:
        (fh, *_) = kf.RELEASE_IN.unpack_from(body, 0)
        handle = self._handles.pop(fh, None)
        if handle is None:
            if fh in self._ghosts:
                self._ghosts.discard(fh)
                self._session.free(fh)  # type: ignore[union-attr]
                return _EMPTY
            raise OSError(errno.EBADF, "unknown file handle")
        self._session.free(fh)  # type: ignore[union-attr]
        try:
            self._drop_backing(handle)
        finally:
            self._core.release(handle)
        return _EMPTY

    def _fsync(self, nodeid: int, uid: int, gid: int, pid: int, body: memoryview) -> bytes:
        fh, fsync_flags, _ = kf.FSYNC_IN.unpack_from(body, 0)
        if fh in self._ghosts:
            return _EMPTY  # a file removed while open has no name to make durable
        self._core.fsync(self._handle(fh), bool(fsync_flags & kf.FUSE_FSYNC_FDATASYNC))
        return _EMPTY

    def _fallocate(self, nodeid: int, uid: int, gid: int, pid: int, body: memoryview) -> bytes:
        fh, offset, length, mode, _ = kf.FALLOCATE_IN.unpack_from(body, 0)
        self._core.fallocate(self._handle(fh), mode, offset, length)
        return _EMPTY

    def _destroy(self, nodeid: int, uid: int, gid: int, pid: int, body: memoryview) -> bytes:
        self._stop.set()
        return _EMPTY

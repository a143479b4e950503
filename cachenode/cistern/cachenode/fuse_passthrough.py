"""The kernel FUSE passthrough front end: /dev/fuse spoken directly, reads and writes by the kernel.

With FUSE passthrough (Linux 6.9+) the kernel sends reads, writes, splice and mmap of an open
file straight to a *backing file* that the daemon registered (``FUSE_DEV_IOC_BACKING_OPEN``)
and named in its OPEN/CREATE reply. The daemon only handles metadata, so writes run at local
disk speed. This module translates kernel requests into ``CacheCore`` calls and exceptions
into errno, exactly like the pyfuse3 front end, and keeps the backing ids:

* one backing id per inode at a time, registered on the first open that has a local data
  file, shared by every open of that inode, closed when the last of them is released;
* files the core cannot serve from a local data file yet (``Handle.fd is None``) are opened
  with ``FOPEN_DIRECT_IO`` and served through ``CacheCore.read``/``write``; direct-I/O files
  do not put the inode in the kernel's cached-I/O mode, so they can coexist with passthrough
  opens of the same inode;
* every request is answered exactly once (EIO as a last resort), except FORGET,
  BATCH_FORGET and INTERRUPT, which take no answer. A reply the kernel refuses with ENOENT
  (the caller was interrupted) is rolled back: the lookup is forgotten, the handle released.

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
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

from cistern.cachenode import kernel_fuse as kf
from cistern.cachenode.fuse_session import RESERVED, SessionFile
from cistern.cachenode.holder import TakeoverError

__all__ = ["PassthroughFrontend", "PassthroughUnavailable", "probe_passthrough"]

log = logging.getLogger(__name__)

Handler = Callable[[int, int, int, int, memoryview], Any]

_EMPTY = b""


class PassthroughUnavailable(OSError):
    """The kernel or the process cannot do FUSE passthrough; the message says why."""


#: Directory handles carry this bit and the daemon's epoch (fuse_session), so a handle of a
#: previous daemon is told apart from ours; file handles are session-file slots (< 2**20).
_DIR_FH = 1 << 62


def _split_timeout(seconds: float) -> tuple[int, int]:
    whole = int(seconds)
    return whole, int((seconds - whole) * 1e9)


def _names(body: memoryview, start: int, count: int) -> list[str]:
    """``count`` NUL-terminated UTF-8 names (object keys are UTF-8: anything else is EINVAL)."""
    raw = bytes(body[start:]).split(b"\0", count)
    if len(raw) <= count:
        raise OSError(errno.EINVAL, "malformed name in FUSE request")
    try:
        return [name.decode() for name in raw[:count]]
    except UnicodeDecodeError:
        raise OSError(errno.EINVAL, "file names must be UTF-8") from None


def _name(body: memoryview, start: int = 0) -> str:
    raw = bytes(body[start:])
    end = raw.find(b"\0")
    if end < 0:
        raise OSError(errno.EINVAL, "malformed name in FUSE request")
    try:
        return raw[:end].decode()
    except UnicodeDecodeError:
        raise OSError(errno.EINVAL, "file names must be UTF-8") from None


class _Backing:
    """A registered backing file shared by the open passthrough files of one inode."""

    __slots__ = ("backing_id", "fd", "opens")

    def __init__(self, backing_id: int, fd: int) -> None:
        self.backing_id = backing_id
        self.fd = fd
        self.opens = 0


class _DirHandle:
    __slots__ = ("entries",)

    def __init__(self, entries: list[tuple[bytes, int, int]]) -> None:
        self.entries = entries


class PassthroughFrontend:
    """FUSE front end on /dev/fuse with kernel passthrough for file data.

    ``mount`` mounts and negotiates INIT (raising ``PassthroughUnavailable`` when the kernel
    does not offer passthrough or backing registration fails), ``serve`` answers requests on
    a pool of threads until ``request_stop`` or an external unmount, ``close`` unmounts.
    """

    name = "passthrough"

    def __init__(self, *, threads: int = 8, attr_timeout: float = 1.0,
                 entry_timeout: float = 1.0, negative_timeout: float = 1.0,
                 stop_grace: float = 2.0, spin: float = 100e-6) -> None:
        self.threads = max(1, threads)
        #: Seconds the reading thread keeps polling /dev/fuse after a request before it
        #: sleeps in poll(2): a burst of small-file requests then costs no wake-up each.
        #: 0 turns it off; the CPU spent is bounded by ``spin`` per idle gap.
        self.spin = spin
        self.stop_grace = stop_grace
        self._attr_valid = _split_timeout(attr_timeout)
        self._entry_valid = _split_timeout(entry_timeout)
        self._negative_valid = _split_timeout(negative_timeout)
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
        self._dirs: dict[int, _DirHandle] = {}
        self._dir_fh = itertools.count(_DIR_FH + (1 << 32))
        self._backings: dict[int, _Backing] = {}
        self._backing_lock = threading.Lock()
        self._passthrough_fhs: set[int] = set()  # handles holding a reference on a backing
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
        self.passthrough_opens = 0
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

    # --- lifecycle ----------------------------------------------------------------------------
    def _bind(self, core: Any, mountpoint: str) -> None:
        if not kf.has_cap_sys_admin():
            raise PassthroughUnavailable(
                errno.EPERM, "FUSE passthrough needs CAP_SYS_ADMIN to register backing files")
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
            self.init = kf.negotiate_init(self._devfd, want_passthrough=True)
            if not self.init.passthrough:
                raise PassthroughUnavailable(errno.EOPNOTSUPP, self.init.reason)
            self._session = SessionFile.create(self.init)
        except BaseException:
            self._teardown()
            raise
        self._dir_fh = itertools.count(_DIR_FH | (self._session.epoch & 0x3FFFFFFF) << 32)
        log.info("mounted %s on %s with kernel FUSE passthrough (kernel protocol 7.%d)",
                 fsname, self._mountpoint, self.init.kernel_minor)

    def adopt(self, core: Any, mountpoint: str, devfd: int, session_fd: int, *,
              detached_at: float) -> None:
        """Serve a connection that a previous daemon mounted (handed over by the holder).

        No INIT: what it settled is in the session file. Every handle the kernel holds is
        rebuilt from the session file (the core opens the file again; the backing id the
        kernel still holds is reused, since the kernel refuses a second backing file for an
        inode with passthrough files open). Then FUSE_NOTIFY_RESEND puts the requests the
        dead daemon had read but not answered back in the queue. ``detached_at`` is the
        time.monotonic() at which the previous daemon ended.
        """
        self._bind(core, mountpoint)
        self._devfd = devfd
        try:
            session = SessionFile.attach(session_fd)
        except (OSError, ValueError) as exc:
            raise TakeoverError(f"the session file of the held connection is unusable: "
                                f"{exc}") from exc
        self._session = session
        self.init = session.init
        self.held = True
        self._mounted = True
        self._detached_at = detached_at
        if not session.init.passthrough:
            raise TakeoverError("the held connection was negotiated without passthrough")
        self._dir_fh = itertools.count(_DIR_FH | (session.epoch & 0x3FFFFFFF) << 32)
        self._restore_handles(session)
        try:
            kf.notify_resend(devfd)
        except OSError as exc:
            # Kernels before 6.9: requests the dead daemon had read stay unanswered until the
            # connection is aborted (their callers hang); nothing else is affected.
            log.error("FUSE_NOTIFY_RESEND on %s failed (%s): requests the previous daemon had "
                      "read stay unanswered", self._mountpoint, exc)
        log.info("took over the FUSE connection of %s (takeover %d, %d open handles, kernel "
                 "protocol 7.%d)", self._mountpoint, session.takeovers, len(self._handles),
                 self.init.kernel_minor)

    def _restore_handles(self, session: SessionFile) -> None:
        core = self._core
        for slot in session.slots():
            if slot.state == RESERVED:  # its reply was never written: the kernel cannot have it
                session.free(slot.fh)
                continue
            try:
                handle = core.open(slot.ino, slot.flags & ~(os.O_TRUNC | os.O_CREAT | os.O_EXCL))
            except OSError as exc:
                # Unlinked while open: the entry and its data are gone, but the kernel still
                # holds the file. Its FLUSH, FSYNC and RELEASE are answered as no-ops.
                log.info("node %d on %s: open handle of a removed file (%s)", slot.ino,
                         self._mountpoint, exc.strerror)
                self._ghosts.add(slot.fh)
                continue
            self._handles[slot.fh] = handle
            self._unanswered[slot.unique] = slot.fh
            if slot.passthrough:
                backing = self._backings.get(slot.ino)
                if backing is None:
                    backing = self._backings[slot.ino] = _Backing(slot.backing_id, handle.fd)
                backing.opens += 1
                self._passthrough_fhs.add(handle.fh)

    def handoff_fds(self) -> tuple[int, int]:
        """The /dev/fuse file and the session file, for the holder (``holder.py``)."""
        if self._session is None:
            raise RuntimeError("handoff_fds() before mount()")
        return self._devfd, self._session.fd

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
            worker = threading.Thread(target=self._worker, name=f"fuse-passthrough-{index}",
                                      daemon=True)
            worker.start()
            self._workers.append(worker)
        while not self._stop.is_set() and any(w.is_alive() for w in self._workers):
            self._stop.wait(0.5)
        deadline = time.monotonic() + self.stop_grace
        for worker in self._workers:
            worker.join(max(0.0, deadline - time.monotonic()))
        if self._fatal is not None:
            raise RuntimeError("FUSE passthrough worker failed") from self._fatal

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
            with self._backing_lock:
                self._backings.clear()
            if self._devfd >= 0 and not any(w.is_alive() for w in self._workers):
                os.close(self._devfd)
                self._devfd = -1
            return
        if self._mounted:
            self._mounted = False
            with contextlib.suppress(OSError):
                kf.unmount(self._mountpoint)
        with self._backing_lock:
            backings = list(self._backings.values())
            self._backings.clear()
        for backing in backings:
            with contextlib.suppress(OSError):
                kf.backing_close(self._devfd, backing.backing_id)
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
            "passthroughOpens": self.passthrough_opens,
            "directIoOpens": self.direct_io_opens,
            "openBackingFiles": len(self._backings),
            "held": self.held,
            "takeovers": self._session.takeovers if self._session else 0,
            "lastTakeoverPauseSeconds": self.last_pause,
            "resentRequests": self.resent,
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
        readv = os.readv
        clock = time.monotonic_ns
        spin_ns = int(self.spin * 1e9)
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
                    readv(devfd, [buf])
                except BlockingIOError:
                    # Nothing queued. Right after a request another one usually follows (a
                    # cp -r sends four per file): poll for ``spin`` seconds before sleeping,
                    # since waking a sleeping thread costs more than the request itself.
                    if clock() - last > spin_ns:
                        poller.poll(1000)
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
                body = view[kf.IN_HEADER.size:length - extlen * 8]
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

    def _reply_error(self, unique: int, err: int) -> None:
        try:
            os.write(self._devfd, kf.OUT_HEADER.pack(16, -err, unique))
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENODEV):
                log.error("replying to FUSE request on %s failed: %s", self._mountpoint, exc)

    # --- packing ------------------------------------------------------------------------------
    def _attr_fields(self, a: Any) -> tuple[int, ...]:
        atime, atime_ns = divmod(a.atime_ns, 1_000_000_000)
        mtime, mtime_ns = divmod(a.mtime_ns, 1_000_000_000)
        ctime, ctime_ns = divmod(a.ctime_ns, 1_000_000_000)
        return (a.ino, a.size, a.blocks, atime, mtime, ctime, atime_ns, mtime_ns, ctime_ns,
                a.mode, a.nlink, a.uid, a.gid, 0, a.blksize, 0)

    def _entry(self, a: Any) -> bytes:
        entry_s, entry_ns = self._entry_valid
        attr_s, attr_ns = self._attr_valid
        return kf.ENTRY_OUT.pack(a.ino, 0, entry_s, attr_s, entry_ns, attr_ns,
                                 *self._attr_fields(a))

    def _attr_out(self, a: Any) -> bytes:
        attr_s, attr_ns = self._attr_valid
        return kf.ATTR_OUT.pack(attr_s, attr_ns, 0, *self._attr_fields(a))

    def _entry_reply(self, a: Any) -> tuple[bytes, Callable[[], None]]:
        core = self._core
        ino = a.ino
        return self._entry(a), lambda: core.forget(ino, 1)

    # --- metadata -----------------------------------------------------------------------------
    def _lookup(self, nodeid: int, uid: int, gid: int, pid: int, body: memoryview) -> Any:
        attr = self._core.find(nodeid, _name(body))
        if attr is None:
            return self._negative_entry  # the kernel may cache it for negative_timeout
        return self._entry_reply(attr)

    def _forget(self, nodeid: int, body: memoryview) -> None:
        (nlookup,) = kf.FORGET_IN.unpack_from(body, 0)
        try:
            self._core.forget(nodeid, nlookup)
        except Exception:
            log.exception("forget of node %d on %s failed", nodeid, self._mountpoint)

    def _batch_forget(self, body: memoryview) -> None:
        (count, _) = kf.BATCH_FORGET_IN.unpack_from(body, 0)
        offset = kf.BATCH_FORGET_IN.size
        for _ in range(count):
            nodeid, nlookup = kf.FORGET_ONE.unpack_from(body, offset)
            offset += kf.FORGET_ONE.size
            self._forget_one(nodeid, nlookup)

    def _forget_one(self, nodeid: int, nlookup: int) -> None:
        try:
            self._core.forget(nodeid, nlookup)
        except Exception:
            log.exception("forget of node %d on %s failed", nodeid, self._mountpoint)

    def _getattr(self, nodeid: int, uid: int, gid: int, pid: int, body: memoryview) -> bytes:
        return self._attr_out(self._core.getattr(nodeid))

    def _setattr(self, nodeid: int, uid: int, gid: int, pid: int, body: memoryview) -> bytes:
        (valid, _, fh, size, _, atime, mtime, _, atimensec, mtimensec, _, mode, _, new_uid,
         new_gid, _) = kf.SETATTR_IN.unpack_from(body, 0)
        kwargs: dict[str, Any] = {}
        if valid & kf.FATTR_MODE:
            kwargs["mode"] = stat.S_IMODE(mode)
        if valid & kf.FATTR_UID:
            kwargs["uid"] = new_uid
        if valid & kf.FATTR_GID:
            kwargs["gid"] = new_gid
        if valid & kf.FATTR_SIZE:
            kwargs["size"] = size
        if valid & kf.FATTR_ATIME_NOW:
            kwargs["atime_ns"] = time.time_ns()
        elif valid & kf.FATTR_ATIME:
            kwargs["atime_ns"] = atime * 1_000_000_000 + atimensec
        if valid & kf.FATTR_MTIME_NOW:
            kwargs["mtime_ns"] = time.time_ns()
        elif valid & kf.FATTR_MTIME:
            kwargs["mtime_ns"] = mtime * 1_000_000_000 + mtimensec
        if valid & kf.FATTR_FH:
            handle = self._handles.get(fh)
            if handle is not None:
                kwargs["handle"] = handle
        return self._attr_out(self._core.setattr(nodeid, **kwargs))

    def _mkdir(self, nodeid: int, uid: int, gid: int, pid: int, body: memoryview) -> Any:
        mode, _umask = kf.MKDIR_IN.unpack_from(body, 0)
        attr = self._core.mkdir(nodeid, _name(body, kf.MKDIR_IN.size),
                                stat.S_IFDIR | stat.S_IMODE(mode), uid, gid)
        return self._entry_reply(attr)

    def _mknod(self, nodeid: int, uid: int, gid: int, pid: int, body: memoryview) -> Any:
        mode, _rdev, _umask, _ = kf.MKNOD_IN.unpack_from(body, 0)
        if not stat.S_ISREG(mode):
            raise OSError(errno.EPERM, "only regular files can be created here")
        handle, attr = self._core.create(nodeid, _name(body, kf.MKNOD_IN.size), mode,
                                         os.O_WRONLY | os.O_CREAT | os.O_EXCL, uid, gid)
        self._core.release(handle)
        return self._entry_reply(attr)

    def _unlink(self, nodeid: int, uid: int, gid: int, pid: int, body: memoryview) -> bytes:
        self._core.unlink(nodeid, _name(body))
        return _EMPTY

    def _rmdir(self, nodeid: int, uid: int, gid: int, pid: int, body: memoryview) -> bytes:
        self._core.rmdir(nodeid, _name(body))
        return _EMPTY

    def _rename(self, nodeid: int, uid: int, gid: int, pid: int, body: memoryview) -> bytes:
        (newdir,) = kf.RENAME_IN.unpack_from(body, 0)
        old, new = _names(body, kf.RENAME_IN.size, 2)
        self._core.rename(nodeid, old, newdir, new, 0)
        return _EMPTY

    def _rename2(self, nodeid: int, uid: int, gid: int, pid: int, body: memoryview) -> bytes:
        newdir, flags, _ = kf.RENAME2_IN.unpack_from(body, 0)
        old, new = _names(body, kf.RENAME2_IN.size, 2)
        if flags & ~(kf.RENAME_NOREPLACE | kf.RENAME_EXCHANGE):
            raise OSError(errno.EINVAL, "unsupported rename flags")
        self._core.rename(nodeid, old, newdir, new, flags)
        return _EMPTY

    def _statfs(self, nodeid: int, uid: int, gid: int, pid: int, body: memoryview) -> bytes:
        st = self._core.statfs()
        return kf.STATFS_OUT.pack(st.f_blocks, st.f_bfree, st.f_bavail, st.f_files, st.f_ffree,
                                  st.f_bsize, st.f_namemax, st.f_frsize, 0)

    # --- directories --------------------------------------------------------------------------
    def _snapshot(self, nodeid: int) -> _DirHandle:
        listing = self._core.readdir(nodeid)
        entries: list[tuple[bytes, int, int]] = [(b".", nodeid, stat.S_IFDIR >> 12),
                                                 (b"..", nodeid, stat.S_IFDIR >> 12)]
        for name, attr in listing:
            entries.append((os.fsencode(name), attr.ino, stat.S_IFMT(attr.mode) >> 12))
        return _DirHandle(entries)

    def _opendir(self, nodeid: int, uid: int, gid: int, pid: int, body: memoryview) -> bytes:
        directory = self._snapshot(nodeid)
        fh = next(self._dir_fh)
        self._dirs[fh] = directory
        return kf.OPEN_OUT.pack(fh, 0, 0)

    def _readdir(self, nodeid: int, uid: int, gid: int, pid: int, body: memoryview) -> bytes:
        fh, offset, size, *_ = kf.READ_IN.unpack_from(body, 0)
        directory = self._dirs.get(fh)
        if directory is None:
            if not fh & _DIR_FH:
                raise OSError(errno.EBADF, "unknown directory handle")
            # Opened under a previous daemon: list the directory again (offsets are entry
            # indexes, so a listing that changed meanwhile may repeat or skip a name, as
            # POSIX allows for concurrent changes).
            directory = self._dirs[fh] = self._snapshot(nodeid)
        out = bytearray()
        pack = kf.DIRENT.pack
        entries = directory.entries
        for index in range(offset, len(entries)):
            name, ino, kind = entries[index]
            record = pack(ino, index + 1, len(name), kind) + name
            record += b"\0" * (-len(record) % 8)
            if len(out) + len(record) > size:
                break
            out += record
        return bytes(out)

    def _releasedir(self, nodeid: int, uid: int, gid: int, pid: int, body: memoryview) -> bytes:
        (fh,) = kf.FORGET_IN.unpack_from(body, 0)  # fuse_release_in starts with fh
        self._dirs.pop(fh, None)
        return _EMPTY

    def _fsyncdir(self, nodeid: int, uid: int, gid: int, pid: int, body: memoryview) -> bytes:
        self._core.sync_namespace()  # the namespace lives in the journal
        return _EMPTY

    def _symlink(self, nodeid: int, uid: int, gid: int, pid: int, body: memoryview) -> Any:
        name, target = _names(body, 0, 2)
        return self._entry_reply(self._core.symlink(nodeid, name, target, uid, gid))

    def _link(self, nodeid: int, uid: int, gid: int, pid: int, body: memoryview) -> Any:
        (old_node,) = kf.FORGET_IN.unpack_from(body, 0)  # fuse_link_in: oldnodeid
        return self._entry_reply(self._core.link(old_node, nodeid, _name(body, 8)))

    # --- files --------------------------------------------------------------------------------
    def _open_reply(self, handle: Any) -> tuple[int, int]:
        """Open flags and backing id for a new handle; registers the backing file if needed."""
        if handle.fd is None or handle.fd < 0:
            self.direct_io_opens += 1
            return kf.FOPEN_DIRECT_IO, 0
        ino = handle.ino
        with self._backing_lock:
            backing = self._backings.get(ino)
            if backing is None:
                try:
                    backing_id = kf.backing_open(self._devfd, handle.fd)
                except OSError as exc:
                    # Still correct, only slower: the daemon serves this open's data.
                    log.warning("node %d on %s: registering the backing file failed (%s); "
                                "serving it without passthrough", ino, self._mountpoint, exc)
                    self.direct_io_opens += 1
                    return kf.FOPEN_DIRECT_IO, 0
                backing = _Backing(backing_id, handle.fd)
                self._backings[ino] = backing
            elif backing.fd != handle.fd:
                log.error("node %d on %s: data file changed while open (fd %d -> %d)",
                          ino, self._mountpoint, backing.fd, handle.fd)
                raise OSError(errno.EIO, "data file changed while open")
            backing.opens += 1
        self._passthrough_fhs.add(handle.fh)
        self.passthrough_opens += 1
        return kf.FOPEN_PASSTHROUGH | self._noflush, backing.backing_id

    def _drop_backing(self, handle: Any) -> None:
        if handle.fh not in self._passthrough_fhs:
            return
        self._passthrough_fhs.discard(handle.fh)
        with self._backing_lock:
            backing = self._backings.get(handle.ino)
            if backing is None:
                return
            backing.opens -= 1
            if backing.opens > 0:
                return
            del self._backings[handle.ino]
            try:
                kf.backing_close(self._devfd, backing.backing_id)
            except OSError as exc:
                log.warning("closing backing id %d of node %d on %s failed: %s",
                            backing.backing_id, handle.ino, self._mountpoint, exc)

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
        handle = self._core.open(nodeid, flags)
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
        handle, attr = self._core.create(nodeid, _name(body, kf.CREATE_IN.size), mode, flags,
                                         uid, gid)
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

    # --- requests sent again after a takeover (FUSE_UNIQUE_RESEND) ----------------------------
    def _on_resent(self, opcode: int, unique: int) -> None:
        """A request the previous daemon read and did not answer. When it is the OPEN or
        CREATE whose handle that daemon had recorded, the kernel never got the handle."""
        self.resent += 1
        fh = self._unanswered.pop(unique & ~kf.FUSE_UNIQUE_RESEND, None)
        if fh is not None and opcode in (kf.OPEN, kf.CREATE):
            self._forget_handle(fh)

    def _call_resent(self, opcode: int, handler: Handler, nodeid: int, uid: int, gid: int,
                     pid: int, body: memoryview) -> Any:
        """Run a resent request; the previous daemon may have done it (journaled) before it
        died, so "already exists" / "already gone" answers mean success here."""
        try:
            return handler(nodeid, uid, gid, pid, body)
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOENT):
                raise
            outcome = self._already_done(opcode, exc.errno, nodeid, body)
            if outcome is None:
                raise
            log.info("resent FUSE %s on %s (node %d) had been done by the previous daemon",
                     kf.OPCODE_NAMES.get(opcode, opcode), self._mountpoint, nodeid)
            return outcome

    def _already_done(self, opcode: int, err: int, nodeid: int, body: memoryview) -> Any:
        core = self._core
        if err == errno.ENOENT:
            if opcode in (kf.UNLINK, kf.RMDIR):
                return _EMPTY
            if opcode in (kf.RENAME, kf.RENAME2):
                head = kf.RENAME_IN if opcode == kf.RENAME else kf.RENAME2_IN
                newdir = head.unpack_from(body, 0)[0]
                _old, new = _names(body, head.size, 2)
                return _EMPTY if core.find(newdir, new) is not None else None
            return None
        if opcode == kf.CREATE:
            flags = kf.CREATE_IN.unpack_from(body, 0)[0]
            attr = core.lookup(nodeid, _name(body, kf.CREATE_IN.size))
            handle = core.open(attr.ino, flags & ~(os.O_CREAT | os.O_EXCL))
            return self._created(handle, attr)
        if opcode == kf.MKDIR:
            name = _name(body, kf.MKDIR_IN.size)
        elif opcode == kf.MKNOD:
            name = _name(body, kf.MKNOD_IN.size)
        elif opcode == kf.SYMLINK:
            name = _names(body, 0, 2)[0]
        elif opcode == kf.LINK:
            name = _name(body, 8)
        else:
            return None
        return self._entry_reply(core.lookup(nodeid, name))


def probe_passthrough() -> tuple[bool, str]:
    """Whether FUSE passthrough works here: mounts a throwaway file system to find out.

    Returns ``(True, "")`` or ``(False, reason)``. Checks CAP_SYS_ADMIN and /dev/fuse, that
    INIT offers FUSE_PASSTHROUGH, and that registering a backing file succeeds.
    """
    if not os.path.exists("/dev/fuse"):
        return False, "/dev/fuse does not exist"
    if not kf.has_cap_sys_admin():
        return False, "the daemon lacks CAP_SYS_ADMIN (needed to register backing files)"
    workdir = tempfile.mkdtemp(prefix="cistern-probe-")
    mountpoint = os.path.join(workdir, "mnt")
    os.mkdir(mountpoint)
    devfd = -1
    mounted = False
    try:
        devfd = kf.open_fuse_device()
        kf.mount_fuse(devfd, mountpoint, fsname="cistern-probe", allow_other=False)
        mounted = True
        result = kf.negotiate_init(devfd, want_passthrough=True)
        if not result.passthrough:
            return False, result.reason
        backing_path = os.path.join(workdir, "backing")
        fd = os.open(backing_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            backing_id = kf.backing_open(devfd, fd)
            kf.backing_close(devfd, backing_id)
        except OSError as exc:
            return False, f"registering a backing file failed: {exc.strerror}"
        finally:
            os.close(fd)
        return True, ""
    except OSError as exc:
        return False, f"mounting a FUSE probe file system failed: {exc}"
    finally:
        if mounted:
            with contextlib.suppress(OSError):
                kf.unmount(mountpoint)
        if devfd >= 0:
            os.close(devfd)
        shutil.rmtree(workdir, ignore_errors=True)

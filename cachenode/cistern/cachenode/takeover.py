"""Serving a FUSE connection a previous daemon mounted, and the requests it left unanswered.

``TakeoverHandling`` is a mixin of ``kernel_frontend.KernelFrontend``: ``adopt`` takes a
/dev/fuse file and session file handed over by the holder (``holder.py``), rebuilds every file
handle the kernel holds from the session file (``fuse_session.py``) and asks the kernel to send
again what the dead daemon had read (FUSE_NOTIFY_RESEND). A resent request may already have been
done (journaled) before that daemon died: "already exists" / "already gone" then mean success.
See docs/dev/restart.md.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
from collections.abc import Callable
from typing import Any

from cistern.cachenode import kernel_fuse as kf
from cistern.cachenode.fuse_session import RESERVED, SessionFile, Slot
from cistern.cachenode.holder import TakeoverError
from cistern.cachenode.kernel_requests import DIR_FH, name_at, names_at

__all__ = ["Handler", "TakeoverHandling"]

log = logging.getLogger(__name__)

Handler = Callable[[int, int, int, int, memoryview], Any]

_EMPTY = b""


class TakeoverHandling:
    """Adoption of a held connection and resent-request handling (see the module docstring)."""

    name: str
    init: kf.InitResult | None
    held: bool
    resent: int
    _core: Any
    _mountpoint: str
    _devfd: int
    _mounted: bool
    _session: SessionFile | None
    _detached_at: float | None
    _dir_fh: itertools.count[int]
    _handles: dict[int, Any]
    _ghosts: set[int]
    _unanswered: dict[int, int]
    # implemented by the front end
    _bind: Callable[[Any, str], None]
    _forget_handle: Callable[[int], None]
    _created: Callable[[Any, Any], Any]
    _entry_reply: Callable[[Any], Any]

    def _check_session(self, init: kf.InitResult) -> None:
        """Raise ``TakeoverError`` when the held connection was negotiated for another front
        end (what INIT settled cannot change)."""

    def _restore_slot(self, slot: Slot, handle: Any) -> None:
        """Front-end state of a rebuilt handle (e.g. a passthrough backing id)."""

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
        self._check_session(session.init)
        self._dir_fh = itertools.count(DIR_FH | (session.epoch & 0x3FFFFFFF) << 32)
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
            # A slot recorded for a request that was itself resent carries FUSE_UNIQUE_RESEND;
            # ``_on_resent`` looks the unique up without it.
            self._unanswered[slot.unique & ~kf.FUSE_UNIQUE_RESEND] = slot.fh
            self._restore_slot(slot, handle)

    def handoff_fds(self) -> tuple[int, int]:
        """The /dev/fuse file and the session file, for the holder (``holder.py``)."""
        if self._session is None:
            raise RuntimeError("handoff_fds() before mount()")
        return self._devfd, self._session.fd

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
                _old, new = names_at(body, head.size, 2)
                return _EMPTY if core.find(newdir, new) is not None else None
            return None
        if opcode == kf.CREATE:
            flags = kf.CREATE_IN.unpack_from(body, 0)[0]
            attr = core.lookup(nodeid, name_at(body, kf.CREATE_IN.size))
            handle = core.open(attr.ino, flags & ~(os.O_CREAT | os.O_EXCL))
            return self._created(handle, attr)
        if opcode == kf.MKDIR:
            name = name_at(body, kf.MKDIR_IN.size)
        elif opcode == kf.MKNOD:
            name = name_at(body, kf.MKNOD_IN.size)
        elif opcode == kf.SYMLINK:
            name = names_at(body, 0, 2)[0]
        elif opcode == kf.LINK:
            name = name_at(body, 8)
        else:
            return None
        return self._entry_reply(core.lookup(nodeid, name))

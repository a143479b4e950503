"""The kernel FUSE passthrough front end: reads and writes of open files done by the kernel.

With FUSE passthrough (Linux 6.9+) the kernel sends reads, writes, splice and mmap of an open
file straight to a *backing file* that the daemon registered (``FUSE_DEV_IOC_BACKING_OPEN``)
and named in its OPEN/CREATE reply. The daemon only handles metadata (``kernel_frontend``),
so writes run at local disk speed. This module keeps the backing ids:

* one backing id per inode at a time, registered on the first open that has a local data
  file, shared by every open of that inode, closed when the last of them is released;
* files the core cannot serve from a local data file yet (``Handle.fd is None``) are opened
  with ``FOPEN_DIRECT_IO`` and served through ``CacheCore.read``/``write``; direct-I/O files
  do not put the inode in the kernel's cached-I/O mode, so they can coexist with passthrough
  opens of the same inode;
* a new file's backing id is registered ahead of need: the core's spares thread makes empty
  data files for creates (``CacheCore.on_new_spare``) and this front end registers each one
  there (``_prepare_spare``), so CREATE costs no ``FUSE_DEV_IOC_BACKING_OPEN``. Ids of spares
  something else took (a MKNOD, the S3 endpoint) are closed by a sweep (beyond 96 prepared
  ids, and after a second without requests); correctness never depends on a prepared id
  (without one CREATE registers the file itself).

See docs/dev/passthrough.md for the protocol facts and invariants.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import tempfile
import threading
from typing import Any

from cistern.cachenode import kernel_fuse as kf
from cistern.cachenode.fuse_session import Slot
from cistern.cachenode.holder import TakeoverError
from cistern.cachenode.kernel_frontend import KernelFrontend

__all__ = ["PassthroughFrontend", "PassthroughUnavailable", "probe_passthrough"]

log = logging.getLogger(__name__)


#: Prepared backing ids beyond which those of spares taken elsewhere are swept (the core's
#: pool holds at most 64 spares, ``core.datafiles.SPARE_FILES``).
_PREPARED_MAX = 96


class PassthroughUnavailable(OSError):
    """The kernel or the process cannot do FUSE passthrough; the message says why."""


class _Backing:
    """A registered backing file shared by the open passthrough files of one inode."""

    __slots__ = ("backing_id", "fd", "opens")

    def __init__(self, backing_id: int, fd: int) -> None:
        self.backing_id = backing_id
        self.fd = fd
        self.opens = 0


class PassthroughFrontend(KernelFrontend):
    """FUSE front end on /dev/fuse with kernel passthrough for file data.

    ``mount`` raises ``PassthroughUnavailable`` when the kernel does not offer passthrough
    or the process may not register backing files.
    """

    name = "passthrough"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._backings: dict[int, _Backing] = {}
        self._backing_lock = threading.Lock()
        self._passthrough_fhs: set[int] = set()  # handles holding a reference on a backing
        self.passthrough_opens = 0
        #: Backing ids registered for spare data files: ino -> (backing id, the data file's
        #: inode number on the cache disk, which identifies the file the id serves).
        self._prepared: dict[int, tuple[int, int]] = {}
        self._preparing = False
        self.prepared_creates = 0

    def _bind(self, core: Any, mountpoint: str) -> None:
        if not kf.has_cap_sys_admin():
            raise PassthroughUnavailable(
                errno.EPERM, "FUSE passthrough needs CAP_SYS_ADMIN to register backing files")
        super()._bind(core, mountpoint)
        self._preparing = True
        core.on_new_spare(self._prepare_spare)

    def _prepare_spare(self, ino: int, fd: int) -> None:
        """Register the backing file of a spare data file (on the core's spares thread)."""
        if not self._preparing or self._devfd < 0:
            return
        try:
            data_ino = os.fstat(fd).st_ino
            backing_id = kf.backing_open(self._devfd, fd)
        except OSError as exc:  # CREATE registers it then, and says so if that fails too
            log.debug("preparing the backing file of spare %d failed: %s", ino, exc)
            return
        with self._backing_lock:
            if self._preparing:
                self._prepared[ino] = (backing_id, data_ino)
                stale = self._stale_prepared() if len(self._prepared) > _PREPARED_MAX else []
            else:
                stale = [backing_id]
        for old in stale:
            with contextlib.suppress(OSError):
                kf.backing_close(self._devfd, old)

    def _idle(self) -> None:
        # Bounds how long a spare taken elsewhere keeps its prepared id (which pins that
        # file's data on the cache disk should it be deleted) when no new spare is made.
        if self._prepared and self._preparing:
            with self._backing_lock:
                stale = self._stale_prepared()
            for old in stale:
                with contextlib.suppress(OSError):
                    kf.backing_close(self._devfd, old)

    def _stale_prepared(self) -> list[int]:
        """Under ``_backing_lock``: forget prepared ids of spares taken by anything but a
        CREATE of this front end; returns them for closing. One a CREATE is about to use
        may be taken too: it then registers the file itself."""
        spares = self._core.spare_inos()
        stale = [ino for ino in self._prepared if ino not in spares]
        return [self._prepared.pop(ino)[0] for ino in stale]

    def _negotiate(self) -> kf.InitResult:
        init = kf.negotiate_init(self._devfd, want_passthrough=True)
        if not init.passthrough:
            raise PassthroughUnavailable(errno.EOPNOTSUPP, init.reason)
        return init

    def _check_session(self, init: kf.InitResult) -> None:
        if not init.passthrough:
            raise TakeoverError("the held connection was negotiated without passthrough")

    def _restore_slot(self, slot: Slot, handle: Any) -> None:
        # The backing id the kernel still holds is reused: it refuses a second backing file
        # for an inode with passthrough files open.
        if slot.passthrough:
            backing = self._backings.get(slot.ino)
            if backing is None:
                backing = self._backings[slot.ino] = _Backing(slot.backing_id, handle.fd)
            backing.opens += 1
            self._passthrough_fhs.add(handle.fh)

    def _release_backings(self, *, close: bool) -> None:
        # Handed to the holder (not ``close``): the backing ids serve open files and the next
        # daemon, and the session file records them.
        # Prepared ids of spares serve no open file: closed in both cases.
        with self._backing_lock:
            backings = list(self._backings.values())
            self._backings.clear()
            self._preparing = False
            prepared = [backing_id for backing_id, _ in self._prepared.values()]
            self._prepared.clear()
        if self._core is not None:
            self._core.on_new_spare(None)
        closing = prepared + ([b.backing_id for b in backings] if close else [])
        if self._devfd >= 0:
            for backing_id in closing:
                with contextlib.suppress(OSError):
                    kf.backing_close(self._devfd, backing_id)

    def _status_extra(self) -> dict[str, Any]:
        return {"passthroughOpens": self.passthrough_opens,
                "preparedCreates": self.prepared_creates,
                "openBackingFiles": len(self._backings)}

    def _open_reply(self, handle: Any) -> tuple[int, int]:
        """Open flags and backing id for a new handle; registers the backing file if needed."""
        if handle.fd is None or handle.fd < 0:
            self.direct_io_opens += 1
            return kf.FOPEN_DIRECT_IO, 0
        ino = handle.ino
        with self._backing_lock:
            backing = self._backings.get(ino)
            prepared = self._prepared.pop(ino, None) if self._prepared else None
            if prepared is not None:
                # A CREATE that took this spare: the handle's fd is the spare's own. Anything
                # else (the spare went elsewhere, its data file was replaced since) fails the
                # identity check and the id is dropped, never used for another file.
                if backing is None and os.fstat(handle.fd).st_ino == prepared[1]:
                    backing = _Backing(prepared[0], handle.fd)
                    self._backings[ino] = backing
                    self.prepared_creates += 1
                else:
                    with contextlib.suppress(OSError):
                        kf.backing_close(self._devfd, prepared[0])
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

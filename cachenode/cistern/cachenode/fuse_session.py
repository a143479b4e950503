"""What one FUSE connection must carry from a dead daemon to the next one.

A *session file* (a memfd) lives exactly as long as the /dev/fuse file it belongs to: the
daemon creates it at mount and hands both to the holder (``holder.py``), and the next daemon
receives both. It holds:

* a header with what INIT settled (the kernel never sends INIT again on a connection), the
  number of takeovers and an *epoch* that changes with every daemon, so that directory
  handles of a previous daemon are recognised;
* a table of open file handles, one 32-byte slot per handle the kernel holds. The file
  handle given to the kernel *is* the slot number (+1), so a new daemon can rebuild every
  handle: the inode, the open flags and the passthrough backing id are in the slot.

Writes are plain stores into shared memory (no system call on the open path). They only
have to survive the death of the process, never a power cut: a power cut ends the FUSE
connection too. A slot is written completely before its state word, and its state word is
cleared first on release, so a daemon killed half-way leaves a slot either unused or whole.

Slot states: ``RESERVED`` (the handle exists, its OPEN/CREATE reply is not written yet: the
kernel cannot know it), ``OPEN`` (the reply is about to be written or was; ``unique`` names
the request, so that a request the kernel sends again after FUSE_NOTIFY_RESEND tells the new
daemon that the reply never arrived).
"""

from __future__ import annotations

import mmap
import os
import struct
import threading
from dataclasses import dataclass
from typing import Any

from cistern.cachenode import kernel_fuse as kf

__all__ = ["OPEN", "RESERVED", "SessionFile", "SessionFileError", "Slot"]

MAGIC = b"CSTNFUS1"
VERSION = 1
#: magic, version, kernel_major, kernel_minor, minor, passthrough, epoch, kernel_flags, flags,
#: takeovers, slot high-water mark
HEADER = struct.Struct("<8sIIIIIIQQII")
HEADER_SPACE = 4096
#: state, open flags, ino, backing id, passthrough, unique of the OPEN/CREATE request
SLOT = struct.Struct("<IIQiIQ")
#: Handles the table can hold (the file is sparse: pages are only allocated when touched).
CAPACITY = 1 << 20

FREE = 0
OPEN = 1
RESERVED = 2

_pack_slot = SLOT.pack_into
_pack_u32 = struct.Struct("<I").pack_into
_pack_u64 = struct.Struct("<Q").pack_into

assert HEADER.size <= HEADER_SPACE and SLOT.size == 32


class SessionFileError(ValueError):
    """The session file is not one this version understands."""


@dataclass(frozen=True, slots=True)
class Slot:
    fh: int
    state: int
    flags: int
    ino: int
    backing_id: int
    passthrough: bool
    unique: int


class SessionFile:
    """The shared-memory record of one FUSE connection (see the module docstring)."""

    def __init__(self, fd: int, init: kf.InitResult, *, epoch: int, takeovers: int,
                 high: int) -> None:
        self.fd = fd
        self.init = init
        self.epoch = epoch
        self.takeovers = takeovers
        self._map = mmap.mmap(fd, HEADER_SPACE + CAPACITY * SLOT.size)
        self._high = high
        self._free: list[int] = []
        self._lock = threading.Lock()

    # --- creating and attaching ---------------------------------------------------------------
    @classmethod
    def create(cls, init: kf.InitResult) -> SessionFile:
        """A new session file for a connection that just answered INIT."""
        fd = os.memfd_create("cistern-fuse-session", os.MFD_CLOEXEC)
        os.ftruncate(fd, HEADER_SPACE + CAPACITY * SLOT.size)
        session = cls(fd, init, epoch=1, takeovers=0, high=0)
        session._write_header()
        return session

    @staticmethod
    def read_init(fd: int) -> kf.InitResult:
        """What INIT settled for the connection of session file ``fd`` (read only)."""
        raw = os.pread(fd, HEADER.size, 0)
        if len(raw) < HEADER.size:
            raise SessionFileError(f"session file too small ({len(raw)} bytes)")
        return _init_of(HEADER.unpack(raw))

    @classmethod
    def attach(cls, fd: int) -> SessionFile:
        """Take over the session file of a previous daemon: a new epoch, one more takeover."""
        size = os.fstat(fd).st_size
        if size < HEADER_SPACE + CAPACITY * SLOT.size:
            raise SessionFileError(f"session file too small ({size} bytes)")
        raw = os.pread(fd, HEADER.size, 0)
        (magic, version, major, kminor, minor, passthrough, epoch, kflags, flags, takeovers,
         high) = HEADER.unpack(raw)
        init = _init_of((magic, version, major, kminor, minor, passthrough, epoch, kflags,
                         flags, takeovers, high))
        session = cls(fd, init, epoch=epoch + 1, takeovers=takeovers + 1, high=high)
        session._free = [index for index in range(high)
                         if session._state(index) == FREE]
        session._write_header()
        return session

    def _write_header(self) -> None:
        i = self.init
        HEADER.pack_into(self._map, 0, MAGIC, VERSION, i.kernel_major, i.kernel_minor, i.minor,
                         int(i.passthrough), self.epoch, i.kernel_flags, i.flags,
                         self.takeovers, self._high)

    def close(self) -> None:
        self._map.close()
        os.close(self.fd)

    # --- the handle table ---------------------------------------------------------------------
    def _state(self, index: int) -> int:
        return int.from_bytes(self._map[HEADER_SPACE + index * SLOT.size:
                                        HEADER_SPACE + index * SLOT.size + 4], "little")

    def reserve(self, ino: int, flags: int, backing_id: int, passthrough: bool) -> int:
        """Record a new handle (RESERVED) and return the file handle for the kernel.

        On the open path: a slot from the free list costs no lock (list.pop and append are
        atomic); only growing the table takes the lock and moves the high-water mark.
        """
        try:
            index = self._free.pop()
        except IndexError:
            with self._lock:
                index = self._high
                if index >= CAPACITY:
                    raise OSError(23, "too many open files on this mount") from None  # ENFILE
                self._high = index + 1
                _pack_u32(self._map, HEADER.size - 4, self._high)
        offset = HEADER_SPACE + index * 32
        _pack_slot(self._map, offset, FREE, flags, ino, backing_id, passthrough, 0)
        _pack_u32(self._map, offset, RESERVED)
        return index + 1

    def confirm(self, fh: int, unique: int) -> None:
        """The reply naming ``fh`` is about to be written for request ``unique``."""
        offset = HEADER_SPACE + (fh - 1) * 32
        _pack_u64(self._map, offset + 24, unique)
        _pack_u32(self._map, offset, OPEN)

    def free(self, fh: int) -> None:
        _pack_u32(self._map, HEADER_SPACE + (fh - 1) * 32, FREE)
        self._free.append(fh - 1)

    def slots(self) -> list[Slot]:
        """Every slot in use, as the previous daemon left it."""
        out = []
        for index in range(self._high):
            state, flags, ino, backing_id, passthrough, unique = SLOT.unpack_from(
                self._map, HEADER_SPACE + index * SLOT.size)
            if state != FREE:
                out.append(Slot(index + 1, state, flags, ino, backing_id, bool(passthrough),
                                unique))
        return out

    def in_use(self) -> int:
        return self._high - len(self._free)


def _init_of(header: tuple[Any, ...]) -> kf.InitResult:
    magic, version, major, kminor, minor, passthrough, _epoch, kflags, flags, *_ = header
    if magic != MAGIC or version != VERSION:
        raise SessionFileError(f"not a session file of this version ({magic!r} v{version})")
    return kf.InitResult(major, kminor, kflags, minor, flags,
                         bool(kflags & kf.FUSE_PASSTHROUGH), bool(passthrough),
                         "" if passthrough else "passthrough was not negotiated")

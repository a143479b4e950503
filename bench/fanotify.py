"""fanotify(7) through ctypes: the events a "direct" data path follows (docs/dev/direct.md).

Only what the study needs: a group that reports directory file handles and names
(``FAN_REPORT_DFID_NAME``, 5.9+) plus the child's own handle (``FAN_REPORT_FID``), a mark on a
whole file system (``FAN_MARK_FILESYSTEM``: directory-entry events cannot be reported for a
mount mark), and a reader that turns each event into ``(mask, directory path, name)``.
Directory handles are resolved with ``open_by_handle_at`` (CAP_DAC_READ_SEARCH), so the
events say which path was closed or renamed without the daemon keeping a copy of the tree.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass

__all__ = ["FAN_CLOSE_WRITE", "FAN_CREATE", "FAN_DELETE", "FAN_MOVED_FROM", "FAN_MOVED_TO",
           "FAN_ONDIR", "FAN_Q_OVERFLOW", "FAN_RENAME", "Event", "Fanotify"]

FAN_CLOEXEC = 0x1
FAN_NONBLOCK = 0x2
FAN_CLASS_NOTIF = 0x0
FAN_REPORT_FID = 0x200
FAN_REPORT_DIR_FID = 0x400
FAN_REPORT_NAME = 0x800
FAN_REPORT_DFID_NAME = FAN_REPORT_DIR_FID | FAN_REPORT_NAME
FAN_MARK_ADD = 0x1
FAN_MARK_FILESYSTEM = 0x100
FAN_MODIFY = 0x2
FAN_CLOSE_WRITE = 0x8
FAN_MOVED_FROM = 0x40
FAN_MOVED_TO = 0x80
FAN_CREATE = 0x100
FAN_DELETE = 0x200
FAN_Q_OVERFLOW = 0x4000
FAN_RENAME = 0x10000000  # 5.17+: old and new name in one event
FAN_ONDIR = 0x40000000
_INFO_FID = 1
_INFO_DFID_NAME = 2
_INFO_DFID = 3
_INFO_OLD_DFID_NAME = 10
_INFO_NEW_DFID_NAME = 12
_META = struct.Struct("<IBBHQii")
_INFO_HEAD = struct.Struct("<BBH")
_HANDLE_HEAD = struct.Struct("<Ii")
_FSID = 8
_AT_FDCWD = -100

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fanotify_init.argtypes = [ctypes.c_uint, ctypes.c_uint]
_libc.fanotify_init.restype = ctypes.c_int
_libc.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int,
                                ctypes.c_char_p]
_libc.fanotify_mark.restype = ctypes.c_int
_libc.open_by_handle_at.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
_libc.open_by_handle_at.restype = ctypes.c_int


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


@dataclass(frozen=True)
class Event:
    """One event: its mask, and the directory/name it concerns (for a rename: the new one,
    with the old one in ``old_dir``/``old_name``). ``dir`` is None when the directory is gone."""

    mask: int
    dir: str | None
    name: str
    old_dir: str | None = None
    old_name: str = ""

    @property
    def path(self) -> str | None:
        return None if self.dir is None else os.path.join(self.dir, self.name)

    @property
    def old_path(self) -> str | None:
        return None if self.old_dir is None else os.path.join(self.old_dir, self.old_name)


class Fanotify:
    """A notification group marked on the file system holding ``path``."""

    def __init__(self, path: str, mask: int) -> None:
        self.fd = _check(_libc.fanotify_init(
            FAN_CLASS_NOTIF | FAN_CLOEXEC | FAN_REPORT_DFID_NAME | FAN_REPORT_FID,
            os.O_RDONLY | os.O_CLOEXEC), "fanotify_init")
        self._mount_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            _check(_libc.fanotify_mark(self.fd, FAN_MARK_ADD | FAN_MARK_FILESYSTEM, mask,
                                       _AT_FDCWD, os.fsencode(path)), "fanotify_mark")
        except OSError:
            self.close()
            raise
        self._buf = bytearray(1 << 16)

    def close(self) -> None:
        for fd in (self.fd, self._mount_fd):
            if fd >= 0:
                os.close(fd)
        self.fd = self._mount_fd = -1

    def read(self) -> Iterator[Event]:
        """The events of one read(2) (blocks until there is at least one)."""
        n = os.readv(self.fd, [self._buf])
        view = memoryview(self._buf)[:n]
        at = 0
        while at + _META.size <= n:
            event_len, _vers, _res, meta_len, mask, fd, _pid = _META.unpack_from(view, at)
            if fd >= 0:
                os.close(fd)
            yield self._event(mask, view[at + meta_len:at + event_len])
            at += event_len

    def _event(self, mask: int, info: memoryview) -> Event:
        names: dict[int, tuple[str | None, str]] = {}
        at = 0
        while at + _INFO_HEAD.size <= len(info):
            kind, _pad, length = _INFO_HEAD.unpack_from(info, at)
            if length == 0:
                break
            if kind in (_INFO_DFID_NAME, _INFO_OLD_DFID_NAME, _INFO_NEW_DFID_NAME, _INFO_DFID):
                names[kind] = self._dir_and_name(info[at + _INFO_HEAD.size + _FSID:at + length],
                                                 with_name=kind != _INFO_DFID)
            at += length
        new_dir, new_name = names.get(_INFO_NEW_DFID_NAME) or names.get(_INFO_DFID_NAME) \
            or names.get(_INFO_DFID) or (None, "")
        old_dir, old_name = names.get(_INFO_OLD_DFID_NAME, (None, ""))
        return Event(mask, new_dir, new_name, old_dir, old_name)

    def _dir_and_name(self, record: memoryview, *, with_name: bool) -> tuple[str | None, str]:
        size, _kind = _HANDLE_HEAD.unpack_from(record, 0)
        end = _HANDLE_HEAD.size + size
        name = ""
        if with_name:
            raw = bytes(record[end:])
            name = os.fsdecode(raw[:raw.index(0)] if 0 in raw else raw)
        return self._resolve(bytes(record[:end])), name

    def _resolve(self, handle: bytes) -> str | None:
        fd = _libc.open_by_handle_at(self._mount_fd, handle, os.O_PATH | os.O_CLOEXEC)
        if fd < 0:
            if ctypes.get_errno() in (errno.ESTALE, errno.ENOENT):
                return None  # the directory was removed since
            _check(fd, "open_by_handle_at")
        try:
            return os.readlink(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)

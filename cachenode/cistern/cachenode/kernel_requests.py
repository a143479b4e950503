"""Metadata requests of the /dev/fuse front ends: names, attributes, directories, links.

``MetadataHandlers`` turns LOOKUP, GETATTR, SETATTR, MKDIR, MKNOD, UNLINK, RMDIR, RENAME(2),
STATFS, the directory requests, SYMLINK and LINK into ``CacheCore`` calls and packs the
replies. It is a mixin of ``kernel_frontend.KernelFrontend`` (which owns the request loop and
the file handles); exceptions become errno there, not here.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import stat
import time
from collections.abc import Callable
from typing import Any

from cistern.cachenode import kernel_fuse as kf

__all__ = ["DIR_FH", "DirHandle", "MetadataHandlers", "name_at", "names_at", "split_timeout"]

log = logging.getLogger(__name__)

_EMPTY = b""

#: Directory handles carry this bit and the daemon's epoch (fuse_session), so a handle of a
#: previous daemon is told apart from ours; file handles are session-file slots (< 2**20).
DIR_FH = 1 << 62


def split_timeout(seconds: float) -> tuple[int, int]:
    whole = int(seconds)
    return whole, int((seconds - whole) * 1e9)


def names_at(body: memoryview, start: int, count: int) -> list[str]:
    """``count`` NUL-terminated UTF-8 names (object keys are UTF-8: anything else is EINVAL)."""
    raw = bytes(body[start:]).split(b"\0", count)
    if len(raw) <= count:
        raise OSError(errno.EINVAL, "malformed name in FUSE request")
    try:
        return [name.decode() for name in raw[:count]]
    except UnicodeDecodeError:
        raise OSError(errno.EINVAL, "file names must be UTF-8") from None


def name_at(body: memoryview, start: int = 0) -> str:
    raw = bytes(body[start:])
    end = raw.find(b"\0")
    if end < 0:
        raise OSError(errno.EINVAL, "malformed name in FUSE request")
    try:
        return raw[:end].decode()
    except UnicodeDecodeError:
        raise OSError(errno.EINVAL, "file names must be UTF-8") from None



class DirHandle:
    __slots__ = ("entries",)

    def __init__(self, entries: list[tuple[bytes, int, int]]) -> None:
        self.entries = entries


class MetadataHandlers:
    """Handlers of the metadata requests; each takes (nodeid, uid, gid, pid, body)."""

    _core: Any
    _mountpoint: str
    _attr_valid: tuple[int, int]
    _entry_valid: tuple[int, int]
    _negative_entry: bytes
    _handles: dict[int, Any]
    _dirs: dict[int, DirHandle]
    _dir_fh: itertools.count[int]

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
        attr = self._core.find(nodeid, name_at(body))
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
        attr = self._core.mkdir(nodeid, name_at(body, kf.MKDIR_IN.size),
                                stat.S_IFDIR | stat.S_IMODE(mode), uid, gid)
        return self._entry_reply(attr)

    def _mknod(self, nodeid: int, uid: int, gid: int, pid: int, body: memoryview) -> Any:
        mode, _rdev, _umask, _ = kf.MKNOD_IN.unpack_from(body, 0)
        if not stat.S_ISREG(mode):
            raise OSError(errno.EPERM, "only regular files can be created here")
        handle, attr = self._core.create(nodeid, name_at(body, kf.MKNOD_IN.size), mode,
                                         os.O_WRONLY | os.O_CREAT | os.O_EXCL, uid, gid)
        self._core.release(handle)
        return self._entry_reply(attr)

    def _unlink(self, nodeid: int, uid: int, gid: int, pid: int, body: memoryview) -> bytes:
        self._core.unlink(nodeid, name_at(body))
        return _EMPTY

    def _rmdir(self, nodeid: int, uid: int, gid: int, pid: int, body: memoryview) -> bytes:
        self._core.rmdir(nodeid, name_at(body))
        return _EMPTY

    def _rename(self, nodeid: int, uid: int, gid: int, pid: int, body: memoryview) -> bytes:
        (newdir,) = kf.RENAME_IN.unpack_from(body, 0)
        old, new = names_at(body, kf.RENAME_IN.size, 2)
        self._core.rename(nodeid, old, newdir, new, 0)
        return _EMPTY

    def _rename2(self, nodeid: int, uid: int, gid: int, pid: int, body: memoryview) -> bytes:
        newdir, flags, _ = kf.RENAME2_IN.unpack_from(body, 0)
        old, new = names_at(body, kf.RENAME2_IN.size, 2)
        if flags & ~(kf.RENAME_NOREPLACE | kf.RENAME_EXCHANGE):
            raise OSError(errno.EINVAL, "unsupported rename flags")
        self._core.rename(nodeid, old, newdir, new, flags)
        return _EMPTY

    def _statfs(self, nodeid: int, uid: int, gid: int, pid: int, body: memoryview) -> bytes:
        st = self._core.statfs()
        return kf.STATFS_OUT.pack(st.f_blocks, st.f_bfree, st.f_bavail, st.f_files, st.f_ffree,
                                  st.f_bsize, st.f_namemax, st.f_frsize, 0)

    # --- directories --------------------------------------------------------------------------
    def _snapshot(self, nodeid: int) -> DirHandle:
        listing = self._core.readdir(nodeid)
        entries: list[tuple[bytes, int, int]] = [(b".", nodeid, stat.S_IFDIR >> 12),
                                                 (b"..", nodeid, stat.S_IFDIR >> 12)]
        for name, attr in listing:
            entries.append((os.fsencode(name), attr.ino, stat.S_IFMT(attr.mode) >> 12))
        return DirHandle(entries)

    def _opendir(self, nodeid: int, uid: int, gid: int, pid: int, body: memoryview) -> bytes:
        directory = self._snapshot(nodeid)
        fh = next(self._dir_fh)
        self._dirs[fh] = directory
        return kf.OPEN_OUT.pack(fh, 0, 0)

    def _readdir(self, nodeid: int, uid: int, gid: int, pid: int, body: memoryview) -> bytes:
        fh, offset, size, *_ = kf.READ_IN.unpack_from(body, 0)
        directory = self._dirs.get(fh)
        if directory is None:
            if not fh & DIR_FH:
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
        name, target = names_at(body, 0, 2)
        return self._entry_reply(self._core.symlink(nodeid, name, target, uid, gid))

    def _link(self, nodeid: int, uid: int, gid: int, pid: int, body: memoryview) -> Any:
        (old_node,) = kf.FORGET_IN.unpack_from(body, 0)  # fuse_link_in: oldnodeid
        return self._entry_reply(self._core.link(old_node, nodeid, name_at(body, 8)))

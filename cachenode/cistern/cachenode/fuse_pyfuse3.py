"""The pyfuse3 (libfuse 3) front end. The one place its errors become errno values.

Requests are served on one Trio loop, which must never wait: every core call that can wait for
the object store, for backpressure (admission) or for the disk's journal runs in a worker
thread. Only calls that never wait for any of those (getattr, read from a local data file, a
write that does not pass admission, forget, statfs) run inline. Writes to one inode keep their
order: once a write to it has gone to a thread, later writes to it queue behind it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from functools import wraps
from typing import Any, ParamSpec, TypeVar

import pyfuse3
import trio

from cistern.cachenode.core import Attr, CacheCore, Handle

__all__ = ["Pyfuse3Frontend"]

log = logging.getLogger(__name__)
T = TypeVar("T")
P = ParamSpec("P")
_TTL = 1.0


def _errno_boundary(
        fn: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, Coroutine[Any, Any, T]]:
    """OSError -> its errno; anything else is a bug: log loudly, answer EIO."""

    @wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except Exception:
            log.exception("internal error in FUSE %s", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


def _entry(attr: Attr) -> pyfuse3.EntryAttributes:
    out = pyfuse3.EntryAttributes()
    out.st_ino = attr.ino
    out.generation = 0
    out.entry_timeout = _TTL
    out.attr_timeout = _TTL
    out.st_mode = attr.mode
    out.st_nlink = attr.nlink
    out.st_uid = attr.uid
    out.st_gid = attr.gid
    out.st_rdev = 0
    out.st_size = attr.size
    out.st_blksize = attr.blksize
    out.st_blocks = attr.blocks
    out.st_atime_ns = attr.atime_ns
    out.st_mtime_ns = attr.mtime_ns
    out.st_ctime_ns = attr.ctime_ns
    return out


def _name(raw: bytes) -> str:
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise pyfuse3.FUSEError(errno.EINVAL) from None


@dataclass
class _WriteQueue:
    """Writes to one inode that went to worker threads, in arrival order (trio.Lock is FIFO)."""

    lock: trio.Lock = field(default_factory=trio.Lock)
    users: int = 0


class _Operations(pyfuse3.Operations):  # type: ignore[misc]
    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, core: CacheCore) -> None:
        super().__init__()
        self.core = core
        self.handles: dict[int, Handle] = {}
        self.listings: dict[int, list[tuple[str, Attr]]] = {}
        self._dir_fh = 0
        self._limiter = trio.CapacityLimiter(16)
        self._writes: dict[int, _WriteQueue] = {}

    async def _blocking(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await trio.to_thread.run_sync(lambda: fn(*args, **kwargs),
                                             limiter=self._limiter)

    @_errno_boundary
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> Any:
        return _entry(await self._blocking(self.core.lookup, parent_inode, _name(name)))

    @_errno_boundary
    async def getattr(self, inode: int, ctx: Any = None) -> Any:
        return _entry(self.core.getattr(inode))

    @_errno_boundary
    async def setattr(self, inode: int, attr: Any, fields: Any, fh: int | None,
                      ctx: Any) -> Any:
        kwargs: dict[str, Any] = {}
        if fields.update_mode:
            kwargs["mode"] = attr.st_mode
        if fields.update_uid:
            kwargs["uid"] = attr.st_uid
        if fields.update_gid:
            kwargs["gid"] = attr.st_gid
        if fields.update_size:
            kwargs["size"] = attr.st_size
        if fields.update_mtime:
            kwargs["mtime_ns"] = attr.st_mtime_ns
        if fields.update_atime:
            kwargs["atime_ns"] = attr.st_atime_ns
        handle = self.handles.get(fh) if fh is not None else None
        return _entry(await self._blocking(self.core.setattr, inode, handle=handle, **kwargs))

    async def forget(self, inode_list: Any) -> None:
        for inode, nlookup in inode_list:
            self.core.forget(inode, nlookup)

    @_errno_boundary
    async def opendir(self, inode: int, ctx: Any) -> int:
        listing = await self._blocking(self.core.readdir, inode)
        self._dir_fh += 1
        self.listings[self._dir_fh] = listing
        return self._dir_fh

    @_errno_boundary
    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        listing = self.listings.get(fh, [])
        for index in range(start_id, len(listing)):
            name, attr = listing[index]
            if not pyfuse3.readdir_reply(token, name.encode(), _entry(attr), index + 1):
                break

    async def releasedir(self, fh: int) -> None:
        self.listings.pop(fh, None)

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        await self._blocking(self.core.sync_namespace)

    @_errno_boundary
    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any) -> Any:
        return _entry(await self._blocking(self.core.mkdir, parent_inode, _name(name), mode,
                                           ctx.uid, ctx.gid))

    @_errno_boundary
    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        await self._blocking(self.core.rmdir, parent_inode, _name(name))

    @_errno_boundary
    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        await self._blocking(self.core.unlink, parent_inode, _name(name))

    @_errno_boundary
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: Any) -> None:
        await self._blocking(self.core.rename, parent_inode_old, _name(name_old),
                             parent_inode_new, _name(name_new), flags)

    @_errno_boundary
    async def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx: Any) -> Any:
        return _entry(self.core.symlink(parent_inode, _name(name), target.decode(), ctx.uid,
                                        ctx.gid))

    @_errno_boundary
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes, ctx: Any) -> Any:
        return _entry(self.core.link(inode, new_parent_inode, _name(new_name)))

    def _file_info(self, handle: Handle) -> Any:
        self.handles[handle.fh] = handle
        return pyfuse3.FileInfo(fh=handle.fh, keep_cache=True)

    @_errno_boundary
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: Any) -> Any:
        handle, attr = await self._blocking(self.core.create, parent_inode, _name(name), mode,
                                            flags, ctx.uid, ctx.gid)
        return self._file_info(handle), _entry(attr)

    @_errno_boundary
    async def open(self, inode: int, flags: int, ctx: Any) -> Any:
        return self._file_info(await self._blocking(self.core.open, inode, flags))

    @_errno_boundary
    async def read(self, fh: int, off: int, size: int) -> bytes:
        return self.core.read(self.handles[fh], off, size)

    @_errno_boundary
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        handle = self.handles[fh]
        queue = self._writes.get(handle.ino)
        if queue is None and not self.core.write_may_wait(handle, len(buf)):
            return self.core.write(handle, off, buf)  # nothing of this inode is in a thread
        if queue is None:
            queue = self._writes[handle.ino] = _WriteQueue()
        queue.users += 1
        try:
            async with queue.lock:
                return await self._blocking(self.core.write, handle, off, buf)
        finally:
            queue.users -= 1
            if queue.users == 0:
                del self._writes[handle.ino]

    @_errno_boundary
    async def flush(self, fh: int) -> None:
        handle = self.handles.get(fh)
        if handle is not None:
            await self._blocking(self.core.flush, handle)

    @_errno_boundary
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self._blocking(self.core.fsync, self.handles[fh], bool(datasync))

    @_errno_boundary
    async def release(self, fh: int) -> None:
        handle = self.handles.pop(fh, None)
        if handle is not None:
            await self._blocking(self.core.release, handle)

    @_errno_boundary
    async def statfs(self, ctx: Any) -> Any:
        st = self.core.statfs()
        out = pyfuse3.StatvfsData()
        out.f_bsize = st.f_bsize
        out.f_frsize = st.f_frsize
        out.f_blocks = st.f_blocks
        out.f_bfree = st.f_bfree
        out.f_bavail = st.f_bavail
        out.f_files = st.f_files
        out.f_ffree = st.f_ffree
        out.f_favail = st.f_favail
        out.f_namemax = 255
        return out


class Pyfuse3Frontend:
    name = "pyfuse3"

    def __init__(self) -> None:
        self._token: trio.lowlevel.TrioToken | None = None
        self._mounted = False
        self._stop_requested = False

    def mount(self, core: CacheCore, mountpoint: str, *, allow_other: bool,
              fsname: str) -> None:
        options = set(pyfuse3.default_options)
        options.add(f"fsname={fsname}")
        options.add("subtype=cistern")
        options.discard("default_permissions")
        options.add("default_permissions")
        if allow_other:
            options.add("allow_other")
        options |= {"nosuid", "nodev"}  # issue 13: every mount the node makes
        pyfuse3.init(_Operations(core), mountpoint, options)
        self._mounted = True

    def serve(self) -> None:
        async def main() -> None:
            self._token = trio.lowlevel.current_trio_token()
            if self._stop_requested:
                return
            await pyfuse3.main(min_tasks=2, max_tasks=32)

        trio.run(main)

    def status(self) -> dict[str, Any]:
        return {"frontend": self.name, "passthrough": False}

    def request_stop(self) -> None:
        self._stop_requested = True
        if self._token is not None:
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(pyfuse3.terminate, trio_token=self._token)

    def close(self) -> None:
        if self._mounted:
            self._mounted = False
            try:
                pyfuse3.close(unmount=True)
            except Exception:  # the mount may already be gone (external unmount)
                log.debug("pyfuse3.close failed", exc_info=True)

"""Open a volume directory below a cache mount without ever leaving it.

The path is walked one component at a time with ``O_NOFOLLOW`` relative to the previous
directory's descriptor, so a symlink (or a directory swapped for one while we walk) anywhere in
the volume path is refused instead of followed out of the cache namespace. The bind mount then
uses ``/proc/self/fd/N`` as its source: the very directory that was checked.
"""

from __future__ import annotations

import errno
import os

__all__ = ["ConfinementError", "fd_path", "open_beneath"]

_O_PATH = getattr(os, "O_PATH", 0o10000000)


class ConfinementError(OSError):
    """A component of the volume path is not a plain directory (a symlink, a file...)."""


def fd_path(fd: int) -> str:
    return f"/proc/self/fd/{fd}"


def open_beneath(root: str, relative: str, *, create_mode: int | None = None,
                 group: int | None = None) -> int:
    """An ``O_PATH`` descriptor of ``root/relative``; creates missing components if asked.

    ``relative`` must already be normalised (no empty, ``.`` or ``..`` components). New
    directories get exactly ``create_mode`` (not filtered by the umask) and, if given, group
    ``group``. The caller closes the descriptor.
    """
    parts = relative.split("/")
    for part in parts:
        if part in ("", ".", "..") or "\x00" in part:
            raise ConfinementError(errno.EINVAL, f"invalid path component {part!r}")
    fd = os.open(root, _O_PATH | os.O_DIRECTORY)
    try:
        for part in parts:
            if create_mode is not None:
                try:
                    os.mkdir(part, create_mode, dir_fd=fd)
                    _chmod_beneath(fd, part, create_mode, group)
                except FileExistsError:
                    pass
            try:
                child = os.open(part, _O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise ConfinementError(exc.errno, f"{part!r} in {relative!r} is not a "
                                                      f"directory (symlinks are refused)") from exc
                raise
            os.close(fd)
            fd = child
        return fd
    except BaseException:
        os.close(fd)
        raise


def _chmod_beneath(dir_fd: int, name: str, mode: int, group: int | None) -> None:
    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
    try:
        if group is not None:
            os.fchown(fd, -1, group)  # before the chmod: a chown may clear setgid
        os.fchmod(fd, mode)
    finally:
        os.close(fd)

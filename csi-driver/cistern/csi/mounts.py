"""The node's mount table and the two mount operations the node plugin needs (bind, unmount).

Everything is decided from ``/proc/self/mountinfo`` (idempotent by observation), never by
``stat``-ing a path that may sit on a dead FUSE connection. The operations call ``mount(2)``
and ``umount2(2)`` directly through libc; no shelling out.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "MountEntry",
    "MountTable",
    "bind_mount",
    "read_mount_table",
    "unmount",
]

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_BIND = 0x1000
MS_RELATIME = 0x200000
MNT_DETACH = 0x2
UMOUNT_NOFOLLOW = 0x8

_FLAG_BITS = {"ro": MS_RDONLY, "nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC,
              "noatime": MS_NOATIME, "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME,
              "rw": 0}

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_void_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def _unescape(field: str) -> str:
    r"""mountinfo escapes space, tab, newline and backslash as ``\ooo``."""
    if "\\" not in field:
        return field
    out = []
    i = 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


@dataclass(frozen=True)
class MountEntry:
    """One line of /proc/self/mountinfo."""

    mount_id: int
    parent_id: int
    device: str
    """``major:minor`` of the file system."""
    root: str
    """The directory of the file system mounted here (``/`` or, for bind mounts, a subdir)."""
    mount_point: str
    options: frozenset[str]
    fstype: str
    source: str

    @property
    def read_only(self) -> bool:
        return "ro" in self.options


class MountTable:
    """A snapshot of the mount table; the last entry for a mount point is the visible one."""

    def __init__(self, entries: list[MountEntry]) -> None:
        self.entries = entries
        self._by_point: dict[str, MountEntry] = {}
        for entry in entries:
            self._by_point[entry.mount_point] = entry

    def at(self, path: str | Path) -> MountEntry | None:
        """The mount whose mount point is exactly ``path`` (normalised), if any."""
        return self._by_point.get(os.path.normpath(str(path)))

    def is_mount_point(self, path: str | Path) -> bool:
        return self.at(path) is not None


def parse_mountinfo(text: str) -> MountTable:
    entries = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 10 or "-" not in fields[6:]:
            continue
        sep = fields.index("-", 6)
        entries.append(MountEntry(
            mount_id=int(fields[0]),
            parent_id=int(fields[1]),
            device=fields[2],
            root=_unescape(fields[3]),
            mount_point=_unescape(fields[4]),
            options=frozenset(fields[5].split(",")),
            fstype=fields[sep + 1],
            source=_unescape(fields[sep + 2]),
        ))
    return MountTable(entries)


def read_mount_table() -> MountTable:
    return parse_mountinfo(Path("/proc/self/mountinfo").read_text())


def _check(result: int, what: str, path: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what} {path}: {os.strerror(err)}", path)


def _flag_bits(flags: tuple[str, ...]) -> int:
    bits = 0
    for flag in flags:
        bits |= _FLAG_BITS[flag]
    return bits


def bind_mount(source: str, target: str, *, read_only: bool,
               flags: tuple[str, ...] = ()) -> None:
    """Bind ``source`` onto ``target``, always ``nosuid,nodev``; the flags need a second,
    remounting call (a bind ignores them).

    If the remount fails, the fresh bind is undone, so a writable (or suid-honouring) mount never
    stays where a read-only (nosuid) one was asked for.
    """
    _check(_libc.mount(source.encode(), target.encode(), None,
                       MS_BIND | MS_NOSUID | MS_NODEV, None), "bind mount", target)
    extra = _flag_bits(flags) | (MS_RDONLY if read_only else 0) | MS_NOSUID | MS_NODEV
    if extra:
        result = _libc.mount(None, target.encode(), None, MS_BIND | MS_REMOUNT | extra, None)
        if result != 0:
            err = ctypes.get_errno()
            _libc.umount2(target.encode(), MNT_DETACH)
            raise OSError(err, f"remount {target} with flags: {os.strerror(err)}", target)


def unmount(target: str) -> None:
    """Unmount ``target``; if it is busy, detach it lazily (the kernel finishes later)."""
    result = _libc.umount2(target.encode(), UMOUNT_NOFOLLOW)
    if result != 0:
        err = ctypes.get_errno()
        if err == errno.EINVAL:  # not a mount point (any more): nothing to do
            return
        if err != errno.EBUSY:
            raise OSError(err, f"unmount {target}: {os.strerror(err)}", target)
        _check(_libc.umount2(target.encode(), MNT_DETACH | UMOUNT_NOFOLLOW), "lazy unmount",
               target)

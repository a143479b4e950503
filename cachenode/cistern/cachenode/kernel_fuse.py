"""The kernel FUSE protocol (7.40+) spoken directly on /dev/fuse, without libfuse.

Holds the wire structs and constants the passthrough front end needs (Debian bookworm's
``/usr/include/linux/fuse.h`` is protocol 7.38 and lacks the passthrough pieces), mounting
and unmounting with mount(2)/umount2(2) through ctypes, the INIT negotiation, and the
``FUSE_DEV_IOC_BACKING_OPEN`` / ``FUSE_DEV_IOC_BACKING_CLOSE`` ioctls that register a
backing file with the kernel. Nothing here knows about the cache; see ``fuse_passthrough``.

All structs are little-endian with the kernel's natural alignment, as in
``include/uapi/linux/fuse.h``; each ``struct.Struct`` below names its C struct.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import struct
from dataclasses import dataclass

__all__ = [
    "BackingMap",
    "InitResult",
    "KERNEL_MAJOR",
    "MIN_PASSTHROUGH_MINOR",
    "backing_close",
    "backing_open",
    "has_cap_sys_admin",
    "mount_fuse",
    "negotiate_init",
    "notify_resend",
    "open_fuse_device",
    "read_buffer_size",
    "unmount",
]

# --- protocol version -------------------------------------------------------------------------
KERNEL_MAJOR = 7
#: The minor version we speak. 7.40 added passthrough (fuse_open_out.backing_id,
#: fuse_init_out.max_stack_depth); we never reply with a higher minor, so no later struct
#: change reaches us.
OUR_MINOR = 40
MIN_PASSTHROUGH_MINOR = 40
#: Oldest kernel protocol whose struct layouts match the ones below (fuse_init_out with
#: flags2, 64-byte fuse_init_in).
MIN_KERNEL_MINOR = 36

# --- opcodes (enum fuse_opcode) ---------------------------------------------------------------
LOOKUP = 1
FORGET = 2
GETATTR = 3
SETATTR = 4
READLINK = 5
SYMLINK = 6
MKNOD = 8
MKDIR = 9
UNLINK = 10
RMDIR = 11
RENAME = 12
LINK = 13
OPEN = 14
READ = 15
WRITE = 16
STATFS = 17
RELEASE = 18
FSYNC = 20
SETXATTR = 21
GETXATTR = 22
LISTXATTR = 23
REMOVEXATTR = 24
FLUSH = 25
INIT = 26
OPENDIR = 27
READDIR = 28
RELEASEDIR = 29
FSYNCDIR = 30
GETLK = 31
SETLK = 32
SETLKW = 33
ACCESS = 34
CREATE = 35
INTERRUPT = 36
BMAP = 37
DESTROY = 38
IOCTL = 39
POLL = 40
NOTIFY_REPLY = 41
BATCH_FORGET = 42
FALLOCATE = 43
READDIRPLUS = 44
RENAME2 = 45
LSEEK = 46
COPY_FILE_RANGE = 47
SETUPMAPPING = 48
REMOVEMAPPING = 49
SYNCFS = 50
TMPFILE = 51
STATX = 52
#: Opcodes the kernel expects no reply to.
NO_REPLY_OPCODES = frozenset({FORGET, BATCH_FORGET, INTERRUPT, NOTIFY_REPLY})

OPCODE_NAMES: dict[int, str] = {
    value: name for name, value in globals().items()
    if name.isupper() and isinstance(value, int) and not name.startswith(("KERNEL", "OUR", "MIN"))
}

# --- INIT flags (fuse_init_in/out.flags | flags2 << 32) ---------------------------------------
FUSE_ASYNC_READ = 1 << 0
FUSE_POSIX_LOCKS = 1 << 1
FUSE_ATOMIC_O_TRUNC = 1 << 3
FUSE_BIG_WRITES = 1 << 5
FUSE_DONT_MASK = 1 << 6
FUSE_AUTO_INVAL_DATA = 1 << 12
FUSE_DO_READDIRPLUS = 1 << 13
FUSE_ASYNC_DIO = 1 << 15
FUSE_WRITEBACK_CACHE = 1 << 16
FUSE_PARALLEL_DIROPS = 1 << 18
FUSE_MAX_PAGES = 1 << 22
FUSE_INIT_EXT = 1 << 30
FUSE_PASSTHROUGH = 1 << 37
#: Never combined with FUSE_PASSTHROUGH: the kernel silently turns passthrough off and
#: FUSE_DEV_IOC_BACKING_OPEN then fails with EPERM.
FORBIDDEN_WITH_PASSTHROUGH = FUSE_WRITEBACK_CACHE

#: Set by the kernel in ``fuse_in_header.unique`` of a request it sends again after
#: FUSE_NOTIFY_RESEND (the daemon that had read it died without answering).
FUSE_UNIQUE_RESEND = 1 << 63
#: fuse_notify_code: ask the kernel to queue again every request that was read from this
#: /dev/fuse file but not answered (protocol 7.40, Linux 6.9).
FUSE_NOTIFY_RESEND = 7
MIN_RESEND_MINOR = 40

# --- fuse_open_out.open_flags -----------------------------------------------------------------
FOPEN_DIRECT_IO = 1 << 0
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_NOFLUSH = 1 << 5
FOPEN_PASSTHROUGH = 1 << 7

# --- fuse_setattr_in.valid --------------------------------------------------------------------
FATTR_MODE = 1 << 0
FATTR_UID = 1 << 1
FATTR_GID = 1 << 2
FATTR_SIZE = 1 << 3
FATTR_ATIME = 1 << 4
FATTR_MTIME = 1 << 5
FATTR_FH = 1 << 6
FATTR_ATIME_NOW = 1 << 7
FATTR_MTIME_NOW = 1 << 8
FATTR_CTIME = 1 << 10

FUSE_GETATTR_FH = 1 << 0
FUSE_FSYNC_FDATASYNC = 1 << 0
RENAME_NOREPLACE = 1 << 0
RENAME_EXCHANGE = 1 << 1

# --- structs ----------------------------------------------------------------------------------
#: fuse_in_header: len, opcode, unique, nodeid, uid, gid, pid, total_extlen, padding
IN_HEADER = struct.Struct("<IIQQIIIHH")
#: fuse_out_header: len, error, unique
OUT_HEADER = struct.Struct("<IiQ")
#: fuse_attr: ino, size, blocks, atime, mtime, ctime, atimensec, mtimensec, ctimensec,
#: mode, nlink, uid, gid, rdev, blksize, flags
ATTR_FORMAT = "QQQQQQIIIIIIIIII"
#: fuse_entry_out: nodeid, generation, entry_valid, attr_valid, entry_valid_nsec,
#: attr_valid_nsec, fuse_attr
ENTRY_OUT = struct.Struct("<QQQQII" + ATTR_FORMAT)
#: fuse_attr_out: attr_valid, attr_valid_nsec, dummy, fuse_attr
ATTR_OUT = struct.Struct("<QII" + ATTR_FORMAT)
#: fuse_init_in: major, minor, max_readahead, flags, flags2, unused[11]
INIT_IN = struct.Struct("<IIIII44x")
#: fuse_init_out: major, minor, max_readahead, flags, max_background, congestion_threshold,
#: max_write, time_gran, max_pages, map_alignment, flags2, max_stack_depth, unused[6]
INIT_OUT = struct.Struct("<IIIIHHIIHHII24x")
#: fuse_getattr_in: getattr_flags, dummy, fh
GETATTR_IN = struct.Struct("<IIQ")
#: fuse_setattr_in: valid, padding, fh, size, lock_owner, atime, mtime, ctime, atimensec,
#: mtimensec, ctimensec, mode, unused4, uid, gid, unused5
SETATTR_IN = struct.Struct("<IIQQQQQQIIIIIIII")
#: fuse_forget_in: nlookup
FORGET_IN = struct.Struct("<Q")
#: fuse_batch_forget_in: count, dummy
BATCH_FORGET_IN = struct.Struct("<II")
#: fuse_forget_one: nodeid, nlookup
FORGET_ONE = struct.Struct("<QQ")
#: fuse_mkdir_in: mode, umask
MKDIR_IN = struct.Struct("<II")
#: fuse_mknod_in: mode, rdev, umask, padding
MKNOD_IN = struct.Struct("<IIII")
#: fuse_rename_in: newdir
RENAME_IN = struct.Struct("<Q")
#: fuse_rename2_in: newdir, flags, padding
RENAME2_IN = struct.Struct("<QII")
#: fuse_open_in: flags, open_flags
OPEN_IN = struct.Struct("<II")
#: fuse_create_in: flags, mode, umask, open_flags
CREATE_IN = struct.Struct("<IIII")
#: fuse_open_out: fh, open_flags, backing_id (7.40; "padding" before)
OPEN_OUT = struct.Struct("<QIi")
#: fuse_release_in: fh, flags, release_flags, lock_owner
RELEASE_IN = struct.Struct("<QIIQ")
#: fuse_flush_in: fh, unused, padding, lock_owner
FLUSH_IN = struct.Struct("<QIIQ")
#: fuse_read_in: fh, offset, size, read_flags, lock_owner, flags, padding
READ_IN = struct.Struct("<QQIIQII")
#: fuse_write_in: fh, offset, size, write_flags, lock_owner, flags, padding
WRITE_IN = struct.Struct("<QQIIQII")
#: fuse_write_out: size, padding
WRITE_OUT = struct.Struct("<II")
#: fuse_kstatfs: blocks, bfree, bavail, files, ffree, bsize, namelen, frsize, padding, spare[6]
STATFS_OUT = struct.Struct("<QQQQQIIII24x")
#: fuse_fsync_in: fh, fsync_flags, padding
FSYNC_IN = struct.Struct("<QII")
#: fuse_fallocate_in: fh, offset, length, mode, padding
FALLOCATE_IN = struct.Struct("<QQQII")
#: fuse_dirent header: ino, off, namelen, type (the name follows, padded to 8 bytes)
DIRENT = struct.Struct("<QQII")
#: struct fuse_backing_map: fd, flags, padding
BACKING_MAP = struct.Struct("<iIQ")

assert IN_HEADER.size == 40 and OUT_HEADER.size == 16
assert ENTRY_OUT.size == 128 and ATTR_OUT.size == 104
assert INIT_IN.size == 64 and INIT_OUT.size == 64
assert SETATTR_IN.size == 88 and READ_IN.size == 40 and WRITE_IN.size == 40
assert STATFS_OUT.size == 80 and OPEN_OUT.size == 16 and BACKING_MAP.size == 16

# --- ioctls on /dev/fuse ----------------------------------------------------------------------
#: _IOW(229, 1, struct fuse_backing_map)
FUSE_DEV_IOC_BACKING_OPEN = 0x4010E501
#: _IOW(229, 2, uint32_t)
FUSE_DEV_IOC_BACKING_CLOSE = 0x4004E502

# --- tunables we ask for in INIT --------------------------------------------------------------
MAX_WRITE = 1 << 20
MAX_PAGES = 256
PAGE_SIZE = 4096
MAX_BACKGROUND = 64
CONGESTION_THRESHOLD = 48
#: Backing files live on a plain file system (depth 0), so our mount is depth 1.
MAX_STACK_DEPTH = 1

MS_NOSUID = 2
MS_NODEV = 4
MNT_DETACH = 2
CAP_SYS_ADMIN = 21

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_char_p]
_libc.mount.restype = ctypes.c_int
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.umount2.restype = ctypes.c_int
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc.ioctl.restype = ctypes.c_int


class BackingMap(ctypes.Structure):
    """struct fuse_backing_map."""

    _fields_ = [("fd", ctypes.c_int32), ("flags", ctypes.c_uint32),
                ("padding", ctypes.c_uint64)]


def _raise_errno(what: str) -> None:
    err = ctypes.get_errno()
    raise OSError(err, f"{what}: {os.strerror(err)}")


def read_buffer_size() -> int:
    """Bytes a /dev/fuse read needs: the kernel refuses smaller buffers with EINVAL."""
    return MAX_WRITE + IN_HEADER.size + WRITE_IN.size + 4096


def has_cap_sys_admin() -> bool:
    """Whether this process holds CAP_SYS_ADMIN (needed for backing-file registration)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_SYS_ADMIN & 1)
    except OSError:
        pass
    return False


def open_fuse_device() -> int:
    """Open /dev/fuse for a new connection (close-on-exec, blocking reads)."""
    return os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)


def mount_fuse(devfd: int, mountpoint: str, *, fsname: str, allow_other: bool,
               subtype: str = "cistern") -> None:
    """mount(2) a FUSE file system served by ``devfd`` on ``mountpoint``.

    The kernel queues INIT on ``devfd`` right after; nothing can use the mount until that
    is answered (``negotiate_init``).
    """
    options = f"fd={devfd},rootmode=40000,user_id=0,group_id=0,default_permissions"
    if allow_other:
        options += ",allow_other"
    if _libc.mount(os.fsencode(fsname), os.fsencode(mountpoint),
                   f"fuse.{subtype}".encode(), MS_NOSUID | MS_NODEV, options.encode()) != 0:
        _raise_errno(f"mount fuse.{subtype} on {mountpoint}")


def unmount(mountpoint: str) -> bool:
    """Lazily unmount (MNT_DETACH); False when nothing was mounted there."""
    if _libc.umount2(os.fsencode(mountpoint), MNT_DETACH) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOENT):
        return False
    raise OSError(err, f"umount {mountpoint}: {os.strerror(err)}")


def backing_open(devfd: int, fd: int) -> int:
    """Register ``fd`` as a passthrough backing file; returns the backing id (> 0).

    The id is the ioctl's return value, which ``fcntl.ioctl`` would discard, hence ctypes.
    """
    arg = BackingMap(fd, 0, 0)
    backing_id = _libc.ioctl(devfd, FUSE_DEV_IOC_BACKING_OPEN, ctypes.byref(arg))
    if backing_id < 0:
        _raise_errno("FUSE_DEV_IOC_BACKING_OPEN")
    return backing_id


def backing_close(devfd: int, backing_id: int) -> None:
    """Drop our reference to a backing id; open passthrough files keep their own."""
    arg = ctypes.c_uint32(backing_id)
    if _libc.ioctl(devfd, FUSE_DEV_IOC_BACKING_CLOSE, ctypes.byref(arg)) < 0:
        _raise_errno("FUSE_DEV_IOC_BACKING_CLOSE")


def notify_resend(devfd: int) -> None:
    """FUSE_NOTIFY_RESEND: requests read from ``devfd`` but never answered (their reader
    died) go back to the head of the queue, with ``FUSE_UNIQUE_RESEND`` set in ``unique``.

    Kernels before 6.9 answer EINVAL (an unknown notify code).
    """
    os.write(devfd, OUT_HEADER.pack(OUT_HEADER.size, FUSE_NOTIFY_RESEND, 0))


@dataclass(frozen=True)
class InitResult:
    """What INIT settled."""

    kernel_major: int
    kernel_minor: int
    kernel_flags: int
    """The kernel's offer, flags | flags2 << 32."""
    minor: int
    """The minor version in force (ours or the kernel's, whichever is lower)."""
    flags: int
    """What we replied with."""
    passthrough_offered: bool
    passthrough: bool
    """Passthrough requested and in force."""
    reason: str
    """Why passthrough is off; empty when it is on."""


def _read_request(devfd: int, buf: bytearray) -> int:
    while True:
        try:
            return os.readv(devfd, [buf])
        except InterruptedError:
            continue
        except OSError as exc:
            if exc.errno == errno.ENOENT:  # the request was interrupted before we read it
                continue
            raise


def negotiate_init(devfd: int, *, want_passthrough: bool, want_writeback_cache: bool = False,
                   max_pages: int = MAX_PAGES, buf: bytearray | None = None) -> InitResult:
    """Read the kernel's INIT request from ``devfd`` and answer it.

    Asks for passthrough (minor >= 40, FUSE_INIT_EXT, FUSE_PASSTHROUGH in flags2,
    max_stack_depth 1) when ``want_passthrough`` and the kernel offers it. The write-back
    cache (``want_writeback_cache``, which would switch passthrough off) only without it.
    ``max_pages`` (at most ``MAX_PAGES``) bounds a READ or WRITE; max_write follows from it.
    """
    if want_passthrough and want_writeback_cache:
        raise ValueError("FUSE passthrough and the write-back cache exclude each other")
    buf = buf if buf is not None else bytearray(read_buffer_size())
    n = _read_request(devfd, buf)
    if n < IN_HEADER.size:
        raise OSError(errno.EIO, f"short FUSE request ({n} bytes) instead of INIT")
    _, opcode, unique, *_ = IN_HEADER.unpack_from(buf, 0)
    if opcode != INIT:
        raise OSError(errno.EPROTO, f"expected FUSE INIT, got opcode {opcode}")
    major, minor, max_readahead, flags, flags2 = INIT_IN.unpack_from(buf, IN_HEADER.size)
    if major != KERNEL_MAJOR or minor < MIN_KERNEL_MINOR:
        # Answer with our version so the kernel can fail the mount cleanly.
        os.write(devfd, OUT_HEADER.pack(OUT_HEADER.size, -errno.EPROTO, unique))
        raise OSError(errno.EPROTO, f"kernel FUSE protocol {major}.{minor} is too old "
                                    f"(need 7.{MIN_KERNEL_MINOR}+)")
    kernel_flags = flags | (flags2 << 32 if flags & FUSE_INIT_EXT else 0)
    offered = bool(kernel_flags & FUSE_PASSTHROUGH) and minor >= MIN_PASSTHROUGH_MINOR
    reason = ""
    if not want_passthrough:
        reason = "passthrough not requested"
    elif not offered:
        reason = (f"the kernel (FUSE protocol 7.{minor}) does not offer FUSE_PASSTHROUGH in "
                  "INIT (needs Linux 6.9+ built with CONFIG_FUSE_PASSTHROUGH)")
    passthrough = want_passthrough and offered
    # ATOMIC_O_TRUNC: O_TRUNC reaches OPEN (the core truncates there), saving a SETATTR.
    wanted = (FUSE_ASYNC_READ | FUSE_ATOMIC_O_TRUNC | FUSE_BIG_WRITES | FUSE_MAX_PAGES
              | FUSE_PARALLEL_DIROPS | FUSE_ASYNC_DIO | FUSE_INIT_EXT)
    if passthrough:
        wanted |= FUSE_PASSTHROUGH
    if want_writeback_cache:
        wanted |= FUSE_WRITEBACK_CACHE
    reply_flags = wanted & kernel_flags
    assert not (passthrough and reply_flags & FORBIDDEN_WITH_PASSTHROUGH)
    reply_minor = min(minor, OUR_MINOR)
    payload = INIT_OUT.pack(
        KERNEL_MAJOR, reply_minor, max_readahead, reply_flags & 0xFFFFFFFF,
        MAX_BACKGROUND, CONGESTION_THRESHOLD, min(MAX_WRITE, max_pages * PAGE_SIZE), 1,
        min(max_pages, MAX_PAGES), 0,
        reply_flags >> 32, MAX_STACK_DEPTH if passthrough else 0)
    os.write(devfd, OUT_HEADER.pack(OUT_HEADER.size + len(payload), 0, unique) + payload)
    return InitResult(major, minor, kernel_flags, reply_minor, reply_flags, offered,
                      passthrough, reason)

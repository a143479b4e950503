"""The FUSE wire structs match the kernel's uapi layout (include/uapi/linux/fuse.h, 7.40+)."""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import subprocess
import sys

import pytest

from cistern.cachenode import kernel_fuse as kf


def _iow(kind: int, number: int, size: int) -> int:
    """The _IOW() macro of asm-generic/ioctl.h."""
    return (1 << 30) | (size << 16) | (kind << 8) | number


def test_ioctl_numbers_follow_from_the_struct_sizes() -> None:
    assert _iow(229, 1, ctypes.sizeof(kf.BackingMap)) == kf.FUSE_DEV_IOC_BACKING_OPEN
    assert _iow(229, 2, ctypes.sizeof(ctypes.c_uint32)) == kf.FUSE_DEV_IOC_BACKING_CLOSE
    assert ctypes.sizeof(kf.BackingMap) == kf.BACKING_MAP.size == 16


@pytest.mark.parametrize(("struct_", "size"), [
    (kf.IN_HEADER, 40), (kf.OUT_HEADER, 16), (kf.ENTRY_OUT, 128), (kf.ATTR_OUT, 104),
    (kf.INIT_IN, 64), (kf.INIT_OUT, 64), (kf.SETATTR_IN, 88), (kf.OPEN_OUT, 16),
    (kf.READ_IN, 40), (kf.WRITE_IN, 40), (kf.RELEASE_IN, 24), (kf.FLUSH_IN, 24),
    (kf.STATFS_OUT, 80), (kf.FALLOCATE_IN, 32), (kf.RENAME2_IN, 16), (kf.CREATE_IN, 16),
    (kf.DIRENT, 24), (kf.FORGET_ONE, 16),
])
def test_struct_sizes_match_the_kernel(struct_: object, size: int) -> None:
    assert struct_.size == size  # type: ignore[attr-defined]


def test_open_out_carries_the_backing_id_in_the_former_padding() -> None:
    raw = kf.OPEN_OUT.pack(7, kf.FOPEN_PASSTHROUGH, 3)
    assert raw[:8] == (7).to_bytes(8, "little")
    assert int.from_bytes(raw[8:12], "little") == 1 << 7
    assert int.from_bytes(raw[12:16], "little", signed=True) == 3


def test_init_out_puts_flags2_and_max_stack_depth_where_the_kernel_reads_them() -> None:
    flags = kf.FUSE_INIT_EXT | kf.FUSE_PASSTHROUGH
    raw = kf.INIT_OUT.pack(7, 40, 0, flags & 0xFFFFFFFF, 64, 48, kf.MAX_WRITE, 1,
                           kf.MAX_PAGES, 0, flags >> 32, 1)
    # offsets from struct fuse_init_out: flags @12, max_write @20, max_pages @28,
    # flags2 @32, max_stack_depth @36
    assert int.from_bytes(raw[12:16], "little") == 1 << 30
    assert int.from_bytes(raw[20:24], "little") == 1 << 20
    assert int.from_bytes(raw[28:30], "little") == 256
    assert int.from_bytes(raw[32:36], "little") == 1 << 5  # FUSE_PASSTHROUGH is flags2 bit 5
    assert int.from_bytes(raw[36:40], "little") == 1


def test_passthrough_never_combined_with_writeback_cache() -> None:
    assert kf.FUSE_PASSTHROUGH == 1 << 37
    assert kf.FORBIDDEN_WITH_PASSTHROUGH == kf.FUSE_WRITEBACK_CACHE == 1 << 16


def test_read_buffer_fits_the_largest_write_request() -> None:
    assert kf.read_buffer_size() >= kf.MAX_WRITE + kf.IN_HEADER.size + kf.WRITE_IN.size
    assert kf.MAX_PAGES * 4096 >= kf.MAX_WRITE


def test_opcode_names_cover_the_opcodes() -> None:
    assert kf.OPCODE_NAMES[kf.INIT] == "INIT"
    assert kf.OPCODE_NAMES[kf.RENAME2] == "RENAME2"
    assert kf.OPCODE_NAMES[kf.BATCH_FORGET] == "BATCH_FORGET"


_HAS_CAP = ("from cistern.cachenode import kernel_fuse as kf; "
            "print(kf.has_cap_sys_admin())")


def _has_cap_sys_admin_under(*setpriv_args: str) -> str:
    """has_cap_sys_admin() in a child whose capabilities setpriv(1) set, not re-derived."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) is not installed")
    result = subprocess.run([setpriv, *setpriv_args, sys.executable, "-c", _HAS_CAP],
                            capture_output=True, text=True, timeout=60)
    if result.returncode != 0 and "setpriv:" in result.stderr:
        pytest.skip(f"this machine cannot set those capabilities: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_cap_sys_admin_is_false_once_the_capability_is_dropped() -> None:
    assert _has_cap_sys_admin_under("--bounding-set", "-sys_admin",
                                    "--inh-caps", "-sys_admin") == "False"


def test_cap_sys_admin_is_true_when_the_process_holds_it() -> None:
    if os.geteuid() != 0:
        pytest.skip("only root can raise CAP_SYS_ADMIN into a child's ambient set")
    assert _has_cap_sys_admin_under("--inh-caps", "+sys_admin",
                                    "--ambient-caps", "+sys_admin") == "True"


def test_unmount_of_a_plain_directory_reports_nothing_mounted(tmp_path: object) -> None:
    if os.geteuid() != 0:
        pytest.skip("umount2 needs root")
    assert kf.unmount(str(tmp_path)) is False


def test_backing_open_on_a_non_fuse_fd_fails_cleanly(tmp_path: object) -> None:
    fd = os.open(os.devnull, os.O_RDWR)
    try:
        with pytest.raises(OSError) as info:
            kf.backing_open(fd, fd)
        assert info.value.errno in (errno.ENOTTY, errno.EINVAL, errno.EPERM)
    finally:
        os.close(fd)

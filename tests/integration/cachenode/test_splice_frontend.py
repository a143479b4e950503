"""The splice front end (kernels without FUSE passthrough) on real mounts.

The front end in this process over a real ``CacheCore`` and local-directory object store, to
look at what reached the daemon and the data file; and a real ``cistern-node`` for the choice
``/status`` reports. The POSIX, write-back, recovery, coherence, streaming and real-client
suites run against this front end too (``support.frontends.ON_ALL_FRONTENDS``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cistern.cachenode import kernel_fuse as kf
from cistern.cachenode.frontend import select_frontend
from cistern.cachenode.fuse_passthrough import probe_passthrough
from cistern.cachenode.fuse_splice import SpliceFrontend
from cistern.cachenode.journal import DIRTY
from support.kernelmount import KernelMount, kernel_mount

BLOCK = 256 * 1024


Mounted = KernelMount


def data_file(fs: Mounted, name: str) -> bytes:
    """What the cache's data file of ``name`` holds (not the kernel's view of it)."""
    return fs.core.data_path(os.stat(fs.mount / name).st_ino).read_bytes()


@pytest.fixture(params=["default", "writeback-cache"])
def mounted(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Mounted]:
    frontend = SpliceFrontend(threads=4, writeback_cache=request.param == "writeback-cache")
    with kernel_mount(tmp_path, frontend) as fs:
        yield fs


def test_init_negotiates_the_writeback_cache_and_large_requests(mounted: Mounted) -> None:
    init = mounted.frontend.init
    assert init is not None and not init.passthrough
    assert bool(init.flags & kf.FUSE_WRITEBACK_CACHE) == mounted.frontend.writeback_cache
    assert init.flags & kf.FUSE_MAX_PAGES
    status = mounted.frontend.status()
    assert status["frontend"] == "splice" and status["maxPages"] >= 255


def test_large_writes_are_spliced_and_fsync_puts_every_byte_in_the_data_file(
        mounted: Mounted) -> None:
    """fsync(2) returns only once the data file holds what was written, also with the
    write-back cache, where write(2) returns before the daemon sees a byte."""
    blocks = [os.urandom(BLOCK) for _ in range(64)]  # 16 MiB
    path = mounted.mount / "big.bin"
    with open(path, "wb", buffering=0) as f:
        for block in blocks:
            f.write(block)
        os.fsync(f.fileno())
        assert data_file(mounted, "big.bin") == b"".join(blocks)  # before close
    assert mounted.frontend.spliced_writes > 0
    entry = mounted.core.debug_entry("big.bin")
    assert entry is not None and entry["state"] == DIRTY


def test_appends_land_at_the_end(mounted: Mounted) -> None:
    """With the write-back cache the kernel computes O_APPEND offsets itself; the core must
    not move them again."""
    path = mounted.mount / "log.txt"
    for line in (b"one\n", b"two\n", b"three\n"):
        with open(path, "ab") as f:
            f.write(line)
    assert path.read_bytes() == b"one\ntwo\nthree\n"
    assert data_file(mounted, "log.txt") == b"one\ntwo\nthree\n"


def test_overwrites_truncates_and_reads_of_a_closed_file(mounted: Mounted) -> None:
    path = mounted.mount / "f.bin"
    data = bytearray(os.urandom(3 * BLOCK + 123))
    path.write_bytes(data)
    with open(path, "r+b") as f:
        f.seek(BLOCK + 7)
        f.write(b"x" * 1000)
        f.truncate(2 * BLOCK)
    data[BLOCK + 7:BLOCK + 1007] = b"x" * 1000
    del data[2 * BLOCK:]
    assert path.read_bytes() == data
    assert data_file(mounted, "f.bin") == data
    with open(path, "rb") as f:  # a read that is not page aligned, through the daemon
        f.seek(BLOCK - 5)
        assert f.read(10) == data[BLOCK - 5:BLOCK + 5]


def test_auto_picks_passthrough_where_the_kernel_has_it_else_splice() -> None:
    ok, reason = probe_passthrough()
    frontend, why = select_frontend("auto")
    if ok:
        assert frontend.name == "passthrough" and "offers FUSE passthrough" in why
    else:
        assert frontend.name == "splice" and reason in why
    forced, why = select_frontend("splice")
    assert forced.name == "splice" and "asked for" in why


@pytest.mark.parametrize("frontend", ["splice"], indirect=True)
def test_status_says_which_front_end_runs_and_why(make_node: Any, bucket: str) -> None:
    node = make_node(bucket)
    (node.mount / "a.txt").write_text("hello")
    status = node.status()
    assert status.frontend == "splice"
    assert status.fuse.reason == "asked for (--fuse-frontend splice)"
    assert status.fuse.writeback_cache is False
    assert node.metric("cistern_fuse_frontend", 'frontend="splice"') == 1

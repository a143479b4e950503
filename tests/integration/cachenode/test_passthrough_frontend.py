"""The kernel FUSE passthrough front end on real mounts.

Two tiers: the front end in this process over a real ``CacheCore`` and local-directory object
store (to look at what reached the daemon), and real ``cistern-node`` processes (automatic
selection, /status and /metrics, a SIGKILLed writer). The POSIX, crash-recovery and
real-client suites run against both front ends through the ``frontend`` fixture; these tests
cover what only passthrough has. Each skips, saying why, where the kernel lacks passthrough.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cistern.cachenode import kernel_fuse as kf
from cistern.cachenode.fuse_passthrough import PassthroughFrontend, probe_passthrough
from support.kernelmount import KernelMount, kernel_mount
from support.node import NodeProcess, is_mounted
from support.wait import wait_until

_PROBE: tuple[bool, str] | None = None


def _require_passthrough() -> None:
    global _PROBE
    if _PROBE is None:
        _PROBE = probe_passthrough()
    if not _PROBE[0]:
        pytest.skip(f"kernel FUSE passthrough unavailable on this machine: {_PROBE[1]}")


Mounted = KernelMount


@pytest.fixture
def mounted(tmp_path: Path) -> Iterator[Mounted]:
    _require_passthrough()
    with kernel_mount(tmp_path, PassthroughFrontend(threads=4)) as fs:
        yield fs


def test_probe_and_init_negotiate_passthrough(mounted: Mounted) -> None:
    init = mounted.frontend.init
    assert init is not None and init.passthrough
    assert init.kernel_minor >= kf.MIN_PASSTHROUGH_MINOR
    assert init.minor == kf.OUR_MINOR
    assert init.flags & kf.FUSE_PASSTHROUGH and init.flags & kf.FUSE_INIT_EXT
    assert not init.flags & kf.FUSE_WRITEBACK_CACHE
    status = mounted.status()
    assert status["frontend"] == "passthrough" and status["passthrough"] is True


def test_file_data_bypasses_the_daemon(mounted: Mounted) -> None:
    block = os.urandom(256 * 1024)
    path = mounted.mount / "big.bin"
    before = mounted.frontend.requests
    with open(path, "wb", buffering=0) as f:
        for _ in range(128):  # 32 MiB in 256 KiB writes
            f.write(block)
        os.fsync(f.fileno())
    # A daemon that saw the data would have answered at least 32 WRITEs of 1 MiB.
    assert mounted.frontend.requests - before < 32
    assert mounted.status()["passthroughOpens"] >= 1
    assert os.stat(path).st_size == 128 * len(block)
    with open(path, "rb") as f:
        f.seek(77 * len(block))
        assert f.read(len(block)) == block
    ino = os.stat(path).st_ino
    data_file = mounted.core.data_path(ino)
    assert data_file.stat().st_size == 128 * len(block)


def test_opens_of_one_inode_share_one_backing_file(mounted: Mounted) -> None:
    path = mounted.mount / "shared"
    path.write_bytes(b"")
    wait_until(lambda: mounted.status()["openBackingFiles"] == 0, what="first release")
    with open(path, "r+b", buffering=0) as writer, open(path, "rb", buffering=0) as reader:
        assert mounted.status()["openBackingFiles"] == 1
        writer.write(b"written through one descriptor")
        assert os.pread(reader.fileno(), 100, 0) == b"written through one descriptor"
    wait_until(lambda: mounted.status()["openBackingFiles"] == 0, what="backing id closed")
    # A fresh open registers a new backing file and still sees the data.
    assert path.read_bytes() == b"written through one descriptor"


def test_creates_use_backing_files_registered_ahead(mounted: Mounted) -> None:
    # The daemon's spares thread makes spare data files; the front end registers each one's
    # backing file there, so a CREATE that takes a spare needs no ioctl of its own.
    mounted.core.make_spares()
    frontend = mounted.frontend
    assert frontend._prepared, "no backing file was registered for the spares"
    for i in range(8):
        (mounted.mount / f"f{i}").write_bytes(f"file {i}".encode())
    assert mounted.status()["preparedCreates"] == 8
    for i in range(8):  # the data went to each file's own data file
        path = mounted.mount / f"f{i}"
        assert path.read_bytes() == f"file {i}".encode()
        assert mounted.core.data_path(path.stat().st_ino).read_bytes() == f"file {i}".encode()
    wait_until(lambda: mounted.status()["openBackingFiles"] == 0, what="releases")


def test_prepared_backing_files_of_spares_taken_elsewhere_are_closed(mounted: Mounted) -> None:
    # Spares taken by something other than this front end's CREATE (here the core directly,
    # as the S3 endpoint does; or a MKNOD) leave their prepared id unused: a sweep closes it.
    core, frontend = mounted.core, mounted.frontend
    core.make_spares()
    taken = []
    for i in range(5):  # a few: closed once the reading thread has been idle for a second
        handle, attr = core.create(1, f"direct-{i}", 0o644, os.O_WRONLY, 0, 0)
        core.release(handle)
        taken.append(attr.ino)
    assert set(taken) <= set(frontend._prepared)
    wait_until(lambda: not set(taken) & set(frontend._prepared), what="the idle sweep")
    for i in range(64):  # many: closed when more than 96 are prepared
        handle, _ = core.create(1, f"more-{i}", 0o644, os.O_WRONLY, 0, 0)
        core.release(handle)
    core.make_spares()
    assert set(frontend._prepared) <= core.spare_inos()
    os.mknod(mounted.mount / "made-by-mknod", 0o644 | 0o100000)
    assert (mounted.mount / "made-by-mknod").stat().st_size == 0
    # A spare's prepared id is never used for another file's data.
    (mounted.mount / "after").write_bytes(b"after the sweep")
    assert (mounted.mount / "after").read_bytes() == b"after the sweep"


def test_mmap_writes_reach_the_backing_file(mounted: Mounted) -> None:
    path = mounted.mount / "mapped"
    with open(path, "w+b") as f:
        f.truncate(1 << 20)
        with mmap.mmap(f.fileno(), 1 << 20) as m:
            m[4096:4101] = b"hello"
            m.flush()
    with open(path, "rb") as f:
        f.seek(4096)
        assert f.read(5) == b"hello"
    assert os.stat(path).st_size == 1 << 20


def test_truncate_fallocate_append_and_sizes(mounted: Mounted) -> None:
    path = mounted.mount / "sizes"
    with open(path, "wb") as f:
        f.write(b"x" * 10000)
    with open(path, "ab") as f:
        f.write(b"tail")
    assert os.stat(path).st_size == 10004
    os.truncate(path, 100)
    assert os.stat(path).st_size == 100
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, 65536)
        assert os.fstat(fd).st_size == 65536
    finally:
        os.close(fd)
    with open(path, "wb") as f:  # O_TRUNC reaches the core in OPEN (FUSE_ATOMIC_O_TRUNC)
        f.write(b"new")
    assert path.read_bytes() == b"new"


def test_large_directory_is_listed_across_readdir_calls(mounted: Mounted) -> None:
    directory = mounted.mount / "many"
    directory.mkdir()
    names = {f"{'n' * 120}-{i:04d}" for i in range(600)}  # far more than one 4 KiB reply
    for name in names:
        (directory / name).write_bytes(b"")
    assert set(os.listdir(directory)) == names
    assert os.stat(directory).st_nlink == 2


def test_rename_flags(mounted: Mounted) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    (mounted.mount / "a").write_text("a")
    (mounted.mount / "b").write_text("b")

    def renameat2(old: str, new: str, flags: int) -> int:
        at_fdcwd = -100
        if libc.renameat2(at_fdcwd, os.fsencode(mounted.mount / old), at_fdcwd,
                          os.fsencode(mounted.mount / new), flags) == 0:
            return 0
        return ctypes.get_errno()

    assert renameat2("a", "b", kf.RENAME_NOREPLACE) == errno.EEXIST
    assert renameat2("a", "b", kf.RENAME_EXCHANGE) == errno.EINVAL
    assert renameat2("a", "c", kf.RENAME_NOREPLACE) == 0
    assert sorted(os.listdir(mounted.mount)) == ["b", "c"]
    assert (mounted.mount / "c").read_text() == "a"


def test_bad_names_and_unsupported_requests(mounted: Mounted) -> None:
    with pytest.raises(OSError) as info:
        os.open(os.fsencode(mounted.mount) + b"/\xff\xfe", os.O_CREAT | os.O_WRONLY, 0o644)
    assert info.value.errno == errno.EINVAL
    (mounted.mount / "f").write_text("x")
    with pytest.raises(OSError) as info:
        os.setxattr(mounted.mount / "f", "user.k", b"v")
    assert info.value.errno in (errno.EOPNOTSUPP, errno.ENOSYS)
    with pytest.raises(OSError) as info:
        os.mkfifo(mounted.mount / "fifo")
    assert info.value.errno == errno.EPERM
    assert os.statvfs(mounted.mount).f_bsize > 0
    # The daemon is still healthy after all of that.
    assert (mounted.mount / "f").read_text() == "x"
    assert mounted.status()["errors"] == 0


def test_external_unmount_ends_serve(mounted: Mounted) -> None:
    (mounted.mount / "f").write_text("x")
    subprocess.run(["umount", str(mounted.mount)], check=True)
    mounted.thread.join(10)
    assert not mounted.thread.is_alive()


def test_request_stop_with_a_file_still_open(mounted: Mounted) -> None:
    with open(mounted.mount / "held", "wb") as f:
        f.write(b"data")
        f.flush()
        mounted.frontend.request_stop()
        mounted.thread.join(mounted.frontend.stop_grace + 5)
        assert not mounted.thread.is_alive()
        assert not is_mounted(mounted.mount)


def test_parallel_writers_and_metadata(mounted: Mounted) -> None:
    errors: list[BaseException] = []

    def writer(index: int) -> None:
        try:
            directory = mounted.mount / f"w{index}"
            directory.mkdir()
            for i in range(50):
                data = os.urandom(4096 + i)
                (directory / f"f{i}").write_bytes(data)
                assert (directory / f"f{i}").read_bytes() == data
                os.rename(directory / f"f{i}", directory / f"g{i}")
        except BaseException as exc:  # collected and re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    for index in range(6):
        assert sorted(os.listdir(mounted.mount / f"w{index}")) == sorted(
            f"g{i}" for i in range(50))
    wait_until(lambda: mounted.status()["openBackingFiles"] == 0, what="all releases")


# --- real cistern-node processes ---------------------------------------------------------------

@pytest.fixture
def node_factory(tmp_path: Path, moto: Any) -> Iterator[Callable[..., NodeProcess]]:
    _require_passthrough()
    nodes: list[NodeProcess] = []

    def make(bucket: str, frontend: str) -> NodeProcess:
        workdir = tmp_path / f"node{len(nodes)}"
        workdir.mkdir()
        node = NodeProcess(workdir, f"s3://{bucket}", endpoint_url=moto.endpoint,
                           frontend=frontend)
        nodes.append(node)
        return node.start()

    yield make
    for node in nodes:
        node.stop()


def test_auto_selects_passthrough_and_reports_it(node_factory: Callable[..., NodeProcess],
                                                 bucket: str) -> None:
    node = node_factory(bucket, "auto")
    assert node.status().frontend == "passthrough"
    assert node.metric("cistern_fuse_frontend", 'frontend="passthrough"') == 1
    (node.mount / "f").write_bytes(b"through auto")
    assert (node.mount / "f").read_bytes() == b"through auto"
    fuse = node.status().fuse
    assert fuse.passthrough is True and (fuse.kernel_protocol or "").startswith("7.")
    assert fuse.requests and fuse.passthrough_opens and fuse.passthrough_opens >= 2
    assert fuse.errors == 0
    assert node.metric("cistern_fuse_requests_total") >= fuse.requests
    assert node.metric("cistern_fuse_passthrough_opens_total") >= 2
    assert node.metric("cistern_fuse_eio_replies_total") == 0
    # The files above are closed: RELEASE (asynchronous) gives their backing files back.
    wait_until(lambda: node.metric("cistern_fuse_open_backing_files") == 0, timeout=10,
               what="every backing file released")


def test_sigkilled_writer_is_released_and_uploaded(node_factory: Callable[..., NodeProcess],
                                                   bucket: str, s3: Any) -> None:
    node = node_factory(bucket, "passthrough")
    target = node.mount / "killed.bin"
    script = (
        "import os, sys, time\n"
        f"fd = os.open({str(target)!r}, os.O_WRONLY | os.O_CREAT, 0o644)\n"
        "os.write(fd, b'k' * (3 << 20))\n"
        "os.fsync(fd)\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        assert node.status().open_writers == 1
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    # The kernel sends RELEASE for the killed writer; the last release schedules the upload.
    wait_until(lambda: node.status().open_writers == 0, what="release after SIGKILL")
    node.flush()
    body = s3.get_object(Bucket=bucket, Key="killed.bin")["Body"].read()
    assert body == b"k" * (3 << 20)



def test_open_without_a_registrable_backing_file_is_served_by_the_daemon(
        mounted: Mounted, tmp_path: Path) -> None:
    # A cache directory on a FUSE mount cannot back passthrough files (stacking depth): a node
    # whose cache lives on our mount must serve those opens itself (FOPEN_DIRECT_IO). The
    # nested node is a separate process: a daemon must never be a client of its own mount.
    workdir = tmp_path / "nested"
    workdir.mkdir()
    node = NodeProcess(workdir, f"file://{workdir / 'objects'}", frontend="passthrough",
                       cache_dir=mounted.mount / "nested-cache")
    node.start()
    try:
        data = os.urandom(3 << 20)
        (node.mount / "f").write_bytes(data)
        assert (node.mount / "f").read_bytes() == data
        with open(node.mount / "f", "r+b") as f:
            f.seek(1 << 20)
            f.write(b"patched")
        assert (node.mount / "f").read_bytes()[1 << 20:(1 << 20) + 7] == b"patched"
        assert "serving it without passthrough" in node.log()
    finally:
        node.stop()

"""A full cache disk: journal writes fail, nothing stays in flight, nothing is lost; and a
capacity larger than the disk is refused."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from cistern.cachenode.core import ROOT_INO, CacheCore, UploadWork
from cistern.cachenode.store import LocalDirStore
from cistern.config import CacheConfig, FlushPolicy

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "small"
    root.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(root)], check=True)
    try:
        yield root
    finally:
        subprocess.run(["umount", "-l", str(root)], check=False)


def _fill(path: Path) -> None:
    with open(path, "wb") as f:
        try:
            while True:
                f.write(b"\0" * (64 << 10))
                f.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC


def test_failed_journal_write_leaves_the_upload_retryable(small_disk: Path,
                                                          tmp_path: Path) -> None:
    core = CacheCore(small_disk / "cache", LocalDirStore(tmp_path / "objects"),
                     flush=FlushPolicy(upload_delay=0.0))
    try:
        handle, _ = core.create(ROOT_INO, "ckpt.pt", 0o644, os.O_WRONLY, 0, 0)
        core.write(handle, 0, b"x" * 4096)
        core.release(handle)
        (work,) = core.collect_work(10, force=True)
        assert isinstance(work, UploadWork)
        assert core.prepare_upload(work)
        etag = core.store.put_file(work.key, work.fd, work.size, work.metadata)
        os.close(work.fd)
        _fill(small_disk / "filler")
        core.finish_upload(work, etag, None)
        assert core.journal_errors >= 1, "the journal write did not fail: the disk was not full"
        assert core.debug_entry("ckpt.pt") == {
            "ino": work.ino, "state": "dirty", "remote_key": "ckpt.pt", "local": True,
            "size": 4096, "in_flight": False}
        assert not core.idle(), "the file must still wait for a journaled upload"
        (small_disk / "filler").unlink()
        (again,) = core.collect_work(10, force=True)
        assert isinstance(again, UploadWork)
        assert core.prepare_upload(again)
        core.finish_upload(again, core.store.put_file(again.key, again.fd, again.size,
                                                      again.metadata), None)
        os.close(again.fd)
        assert core.debug_entry("ckpt.pt")["state"] == "clean"  # type: ignore[index]
        assert core.idle()
    finally:
        core.close()


def test_capacity_larger_than_the_disk_is_refused(small_disk: Path, tmp_path: Path) -> None:
    with pytest.raises(OSError, match="larger than the file system"):
        CacheCore(small_disk / "cache", LocalDirStore(tmp_path / "objects"),
                  cache=CacheConfig(capacity_bytes=1 << 30))

"""The cache core without FUSE or network: state machine, key ownership, commit markers."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from cistern.cachenode.core import ROOT_INO, CacheCore, DeleteWork, MoveWork, UploadWork
from cistern.cachenode.store import LocalDirStore
from cistern.config import FlushPolicy


@pytest.fixture
def core(tmp_path: Path) -> Any:
    c = CacheCore(tmp_path / "cache", LocalDirStore(tmp_path / "objects"),
                  flush=FlushPolicy(upload_delay=0.0))
    yield c
    c.close()


def _write(core: CacheCore, parent: int, name: str, data: bytes) -> int:
    handle, attr = core.create(parent, name, 0o644, os.O_WRONLY, 0, 0)
    core.write(handle, 0, data)
    core.release(handle)
    return attr.ino


def _run_all(core: CacheCore) -> list[Any]:
    """Play the flusher: execute every due operation against the local store."""
    done: list[Any] = []
    for _ in range(20):
        work = core.collect_work(100, force=True)
        if not work:
            return done
        for item in work:
            done.append(item)
            if isinstance(item, UploadWork):
                etag = core.store.put_file(item.key, item.fd, item.size, item.metadata)
                os.close(item.fd)
                core.finish_upload(item, etag, None)
            elif isinstance(item, MoveWork):
                core.store.copy(item.src, item.dst, item.metadata)
                core.finish_move(item, None)
            else:
                core.store.delete(item.key)
                core.finish_delete(item, None)
    raise AssertionError("flusher work never converged")


def test_upload_then_clean(core: CacheCore) -> None:
    _write(core, ROOT_INO, "a", b"hello")
    assert core.dirty_bytes == 5
    work = _run_all(core)
    assert [type(w) for w in work] == [UploadWork]
    assert core.dirty_bytes == 0 and core.clean_bytes == 5
    assert core.idle()


def test_rename_before_upload_uploads_once_under_final_name(core: CacheCore) -> None:
    _write(core, ROOT_INO, "x.tmp", b"data")
    core.rename(ROOT_INO, "x.tmp", ROOT_INO, "x")
    work = _run_all(core)
    assert [(type(w).__name__, getattr(w, "key", None)) for w in work] == [("UploadWork", "x")]


def test_replace_uploaded_file_overwrites_without_delete(core: CacheCore) -> None:
    _write(core, ROOT_INO, "latest.pt", b"old")
    _run_all(core)
    _write(core, ROOT_INO, "latest.pt.tmp", b"new")
    core.rename(ROOT_INO, "latest.pt.tmp", ROOT_INO, "latest.pt")
    work = _run_all(core)
    assert [type(w) for w in work] == [UploadWork]
    assert (Path(core.store.root) / "latest.pt").read_bytes() == b"new"  # type: ignore[attr-defined]


def test_rename_uploaded_then_create_at_old_name_never_clobbers(core: CacheCore) -> None:
    _write(core, ROOT_INO, "a", b"first")
    _run_all(core)
    core.rename(ROOT_INO, "a", ROOT_INO, "b")
    _write(core, ROOT_INO, "a", b"second")
    _run_all(core)
    root = Path(core.store.root)  # type: ignore[attr-defined]
    assert (root / "b").read_bytes() == b"first"
    assert (root / "a").read_bytes() == b"second"


def test_delete_after_upload_makes_a_tombstone(core: CacheCore) -> None:
    _write(core, ROOT_INO, "gone", b"x")
    _run_all(core)
    core.unlink(ROOT_INO, "gone")
    work = _run_all(core)
    assert work == [DeleteWork("gone")]
    assert not (Path(core.store.root) / "gone").exists()  # type: ignore[attr-defined]


def test_commit_marker_waits_for_shards(core: CacheCore) -> None:
    step = core.mkdir(ROOT_INO, "step-1", 0o755, 0, 0).ino
    _write(core, step, "__0_0.distcp", b"shard0")
    # Shard 1 was opened before the marker was written and is still open (its release is
    # asynchronous in FUSE): the marker may not go before it.
    handle, _ = core.create(step, "__1_0.distcp", 0o644, os.O_WRONLY, 0, 0)
    _write(core, step, ".metadata.tmp", b"meta")
    core.rename(step, ".metadata.tmp", step, ".metadata")
    first = core.collect_work(10, force=True)
    keys = [w.key for w in first if isinstance(w, UploadWork)]
    assert "step-1/.metadata" not in keys and "step-1/__0_0.distcp" in keys
    for item in first:
        assert isinstance(item, UploadWork)
        core.finish_upload(item, core.store.put_file(item.key, item.fd, item.size, {}), None)
        os.close(item.fd)
    core.write(handle, 0, b"shard1")
    core.release(handle)
    order = [w.key for w in _run_all(core) if isinstance(w, UploadWork)]
    assert order == ["step-1/__1_0.distcp", "step-1/.metadata"]


def test_commit_marker_is_due_once_its_shards_are_uploaded(tmp_path: Path) -> None:
    """``uploadDelay`` holds ordinary files, not a commit marker: once the files written
    before it are in the store, it goes at once (issue 16: a second sooner per DCP save)."""
    c = CacheCore(tmp_path / "cache", LocalDirStore(tmp_path / "objects"),
                  flush=FlushPolicy(upload_delay=600.0))
    try:
        step = c.mkdir(ROOT_INO, "step-1", 0o755, 0, 0).ino
        _write(c, step, "__0_0.distcp", b"shard0")
        _write(c, step, ".metadata", b"meta")
        assert c.collect_work(10) == []  # the shard rests; the marker waits for it
        shards = c.collect_work(10, force=True)  # the shard leaves (streamed, flushed)
        assert [w.key for w in shards if isinstance(w, UploadWork)] == ["step-1/__0_0.distcp"]
        for item in shards:
            assert isinstance(item, UploadWork)
            c.finish_upload(item, c.store.put_file(item.key, item.fd, item.size, {}), None)
            os.close(item.fd)
        marker = c.collect_work(10)  # not forced: due without waiting 600 s
        assert [w.key for w in marker if isinstance(w, UploadWork)] == ["step-1/.metadata"]
        for item in marker:
            assert isinstance(item, UploadWork)
            os.close(item.fd)
    finally:
        c.close()


def test_journal_survives_restart(tmp_path: Path) -> None:
    store = LocalDirStore(tmp_path / "objects")
    first = CacheCore(tmp_path / "cache", store, flush=FlushPolicy(upload_delay=0.0))
    ino = _write(first, ROOT_INO, "keep", b"journaled")
    first.journal._db.close()  # a crash: no orderly close  # noqa: SLF001
    second = CacheCore(tmp_path / "cache", store, flush=FlushPolicy(upload_delay=0.0))
    attr = second.lookup(ROOT_INO, "keep")
    assert attr.ino == ino and attr.size == 9
    assert [w.key for w in _run_all(second) if isinstance(w, UploadWork)] == ["keep"]
    second.close()


def test_flush_waits_for_files_whose_release_arrives_late(core: CacheCore) -> None:
    handle, _ = core.create(ROOT_INO, "late", 0o644, os.O_WRONLY, 0, 0)
    core.write(handle, 0, b"abc")
    seq = core.request_flush()
    assert not core.idle(seq)
    core.release(handle)  # arrives after the flush request
    assert not core.idle(seq), "a flush must not forget a file released after it started"
    _run_all(core)
    assert core.idle(seq)


def test_directory_link_counts_follow_mkdir_rmdir_rename(core: CacheCore) -> None:
    a = core.mkdir(ROOT_INO, "a", 0o755, 0, 0).ino
    core.mkdir(a, "x", 0o755, 0, 0)
    core.mkdir(a, "y", 0o755, 0, 0)
    _write(core, a, "file", b"f")
    assert core.getattr(a).nlink == 4
    b = core.mkdir(ROOT_INO, "b", 0o755, 0, 0).ino
    core.rename(a, "x", b, "x")
    assert (core.getattr(a).nlink, core.getattr(b).nlink) == (3, 3)
    core.rmdir(a, "y")
    assert core.getattr(a).nlink == 2
    assert core.getattr(ROOT_INO).nlink == 4


def _data_files(cache_dir: Path) -> set[str]:
    return {p.name for p in (cache_dir / "data").glob("*/*")}


def test_creates_take_spare_data_files_whose_inodes_nobody_else_gets(tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    core = CacheCore(cache_dir, LocalDirStore(tmp_path / "objects"))
    try:
        assert core.make_spares(8) == 8
        spares = _data_files(cache_dir)
        assert len(spares) == 8
        inos = [_write(core, ROOT_INO, f"f{i}", f"data {i}".encode()) for i in range(3)]
        assert {str(i) for i in inos} <= spares  # no file system create on the request path
        assert core.spare_count() == 5
        # Inodes made later (a directory, a file once the spares run out) never collide.
        later = core.mkdir(ROOT_INO, "d", 0o755, 0, 0).ino
        for i in range(6):
            inos.append(_write(core, ROOT_INO, f"g{i}", b"x"))
        assert later not in inos and len(set(inos)) == len(inos)
        assert later > max(int(s) for s in spares)
    finally:
        core.close()
    # A clean stop removes the unused spares; the files keep their data.
    assert _data_files(cache_dir) == {str(i) for i in inos}
    again = CacheCore(cache_dir, LocalDirStore(tmp_path / "objects"))
    try:
        attr = again.lookup(ROOT_INO, "f1")
        handle = again.open(attr.ino, os.O_RDONLY)
        assert again.read(handle, 0, 100) == b"data 1"
        again.release(handle)
    finally:
        again.close()


def test_a_front_end_sees_each_spare_before_a_create_can_take_it(tmp_path: Path) -> None:
    core = CacheCore(tmp_path / "cache", LocalDirStore(tmp_path / "objects"))
    seen: dict[int, int] = {}
    try:
        core.on_new_spare(lambda ino, fd: seen.setdefault(ino, os.fstat(fd).st_ino))
        core.make_spares(4)
        assert set(seen) == core.spare_inos() and len(seen) == 4
        handle, attr = core.create(ROOT_INO, "new", 0o644, os.O_WRONLY, 0, 0)
        # The create took one of them, with the very data file the hook was shown.
        assert attr.ino in seen and attr.ino not in core.spare_inos()
        assert os.fstat(handle.fd).st_ino == seen[attr.ino]
        core.release(handle)
        core.on_new_spare(None)
        core.make_spares(4)
        assert len(seen) == 4  # unhooked
    finally:
        core.close()


def test_spares_left_by_a_crash_are_removed_and_their_inodes_stay_reserved(
        tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    crashed = CacheCore(cache_dir, LocalDirStore(tmp_path / "objects"))
    crashed.make_spares(4)
    kept = _write(crashed, ROOT_INO, "kept", b"kept")
    reserved = {int(s) for s in _data_files(cache_dir)}
    # No close(): the process "died" with 3 spares on disk and their inodes reserved.
    restarted = CacheCore(cache_dir, LocalDirStore(tmp_path / "objects"))
    try:
        assert _data_files(cache_dir) == {str(kept)}
        assert restarted.lookup(ROOT_INO, "kept").size == 4
        new = _write(restarted, ROOT_INO, "new", b"n")
        assert new > max(reserved)
        restarted.make_spares(2)
        spares = _data_files(cache_dir) - {str(kept), str(new)}
        assert len(spares) == 2 and all(int(s) > max(reserved) for s in spares)
    finally:
        # Not crashed.close(): it would apply the dead process's intent log a second time.
        restarted.close()


def test_hints_say_when_a_request_can_be_answered_inline(core: CacheCore) -> None:
    ino = _write(core, ROOT_INO, "f", b"abc")
    assert core.listing_ready(ROOT_INO) and core.is_local(ino) and core.admits_now()
    assert not core.listing_ready(12345) and not core.is_local(12345)
    core.set_draining(True)
    assert not core.admits_now()  # a drain may hold new writers
    core.set_draining(False)
    core.capacity_bytes = 2  # 3 dirty bytes: above the high watermark, writers get slowed
    assert not core.admits_now()


def _backlog(core: CacheCore) -> dict[str, int]:
    """The counted backlog, checked against the same numbers found by walking the queue."""
    summary = core.pending_summary()
    assert summary == core._queue.count_by_walking()  # noqa: SLF001
    return summary


def test_backlog_counts_are_kept_as_entries_change(tmp_path: Path) -> None:
    core = CacheCore(tmp_path / "cache", LocalDirStore(tmp_path / "objects"),
                     flush=FlushPolicy(upload_delay=0.0))
    handle, attr = core.create(ROOT_INO, "open", 0o644, os.O_WRONLY, 0, 0)
    core.write(handle, 0, b"being written")
    _write(core, ROOT_INO, "a", b"alpha")
    _write(core, ROOT_INO, "temp", b"t")
    assert _backlog(core) == {"dirty_files": 3, "uploading_files": 0, "pending_moves": 0,
                              "pending_deletes": 0, "open_writers": 1}
    core.unlink(ROOT_INO, "temp")
    work = core.collect_work(10, force=True)
    assert _backlog(core)["uploading_files"] == len(work) == 1
    for item in work:
        assert isinstance(item, UploadWork)
        core.finish_upload(item, core.store.put_file(item.key, item.fd, item.size, {}), None)
        os.close(item.fd)
    assert _backlog(core)["dirty_files"] == 1
    core.rename(ROOT_INO, "a", ROOT_INO, "b")
    assert _backlog(core)["pending_moves"] == 1
    (move,) = core.collect_work(10, force=True)
    assert _backlog(core)["uploading_files"] == 1
    assert isinstance(move, MoveWork)
    core.finish_move(move, OSError("the store is down"))
    assert _backlog(core)["uploading_files"] == 0
    core.release(handle)
    _run_all(core)
    assert _backlog(core) == {"dirty_files": 0, "uploading_files": 0, "pending_moves": 0,
                              "pending_deletes": 0, "open_writers": 0}
    _write(core, ROOT_INO, "after", b"x")
    core.close()
    again = CacheCore(tmp_path / "cache", LocalDirStore(tmp_path / "objects"))
    try:
        assert _backlog(again)["dirty_files"] == 1
    finally:
        again.close()


def test_checkpoint_progress_follows_names_without_a_scan(core: CacheCore) -> None:
    runs = core.mkdir(ROOT_INO, "runs", 0o755, 0, 0).ino
    step1 = core.mkdir(runs, "step-1", 0o755, 0, 0).ino
    _write(core, step1, "shard0", b"0" * 10)
    other = core.mkdir(ROOT_INO, "export", 0o755, 0, 0).ino
    _write(core, other, ".metadata", b"m")  # a commit marker makes any directory a checkpoint
    paths = {c["path"]: c for c in core.checkpoints()}
    assert paths["runs/step-1"]["state"] == "writing"
    assert paths["runs/step-1"]["bytes"] == 10
    assert paths["export"]["state"] == "committed-locally"
    core.rename(runs, "step-1", runs, "old")  # no longer matches checkpointPattern
    core.unlink(other, ".metadata")
    assert core.checkpoints() == []
    core.rename(runs, "old", runs, "step-2")
    _write(core, core.lookup(runs, "step-2").ino, ".metadata", b"m")
    _run_all(core)
    (step2,) = core.checkpoints()
    assert step2["path"] == "runs/step-2" and step2["state"] == "durable"
    assert step2["files"] == 2 and step2["pending_files"] == 0


def test_a_dirty_file_whose_data_file_is_gone_is_not_counted_after_restart(
        tmp_path: Path) -> None:
    first = CacheCore(tmp_path / "cache", LocalDirStore(tmp_path / "objects"))
    handle, attr = first.create(ROOT_INO, "lost", 0o644, os.O_WRONLY, 0, 0)
    first.write(handle, 0, b"never uploaded")
    first.fsync(handle)  # its size is journaled
    first.release(handle)
    lost = attr.ino
    _write(first, ROOT_INO, "kept", b"kept")
    first.journal._db.close()  # a crash  # noqa: SLF001
    first.data_path(lost).unlink()  # and the disk lost the data file
    again = CacheCore(tmp_path / "cache", LocalDirStore(tmp_path / "objects"))
    try:
        assert again.find(ROOT_INO, "lost") is None  # logged as DATA LOSS, entry dropped
        assert again.dirty_bytes == 4  # only "kept"
        assert again.pending_summary()["dirty_files"] == 1
    finally:
        again.close()

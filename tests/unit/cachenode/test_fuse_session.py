"""The session file and the holder protocol: what a new daemon receives from a dead one."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from cistern.cachenode import kernel_fuse as kf
from cistern.cachenode.fuse_session import OPEN, RESERVED, SessionFile, SessionFileError
from cistern.cachenode.holder import HolderClient, HolderError, HolderServer

INIT = kf.InitResult(7, 45, kf.FUSE_PASSTHROUGH | kf.FUSE_INIT_EXT, 40,
                     kf.FUSE_PASSTHROUGH | kf.FUSE_INIT_EXT, True, True, "")


def test_a_new_daemon_finds_init_and_every_open_handle() -> None:
    old = SessionFile.create(INIT)
    kept = old.reserve(ino=17, flags=os.O_WRONLY | os.O_APPEND, backing_id=3, passthrough=True)
    old.confirm(kept, unique=1234)
    released = old.reserve(ino=18, flags=os.O_RDONLY, backing_id=0, passthrough=False)
    old.confirm(released, unique=1236)
    unanswered = old.reserve(ino=19, flags=os.O_RDWR, backing_id=4, passthrough=True)
    old.free(released)
    fd = os.dup(old.fd)
    old.close()  # the dead daemon's copy

    new = SessionFile.attach(fd)
    assert new.init == INIT
    assert (new.takeovers, new.epoch) == (1, 2)
    slots = {slot.fh: slot for slot in new.slots()}
    assert set(slots) == {kept, unanswered}
    assert (slots[kept].state, slots[kept].ino, slots[kept].flags, slots[kept].backing_id,
            slots[kept].passthrough, slots[kept].unique) == \
        (OPEN, 17, os.O_WRONLY | os.O_APPEND, 3, True, 1234)
    assert slots[unanswered].state == RESERVED
    # A freed slot is reused; a live one never is.
    again = new.reserve(ino=20, flags=0, backing_id=0, passthrough=False)
    assert again == released
    assert new.in_use() == 3
    third = SessionFile.attach(os.dup(new.fd))
    assert (third.takeovers, third.epoch) == (2, 3)
    new.close()
    third.close()


def test_a_foreign_file_is_refused(tmp_path: Path) -> None:
    fd = os.memfd_create("not-a-session")
    os.ftruncate(fd, 64 << 20)
    with pytest.raises(SessionFileError):
        SessionFile.attach(fd)
    os.close(fd)


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[str]:
    path = str(tmp_path / "holder.sock")
    server = HolderServer(path)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield path
    server.stop()
    thread.join(10)
    assert not thread.is_alive()


def test_holder_hands_the_files_to_the_next_daemon_only(holder: str) -> None:
    dev_r, dev_w = os.pipe()  # stands in for /dev/fuse: any file can be passed
    session = SessionFile.create(INIT)
    first = HolderClient(holder)
    assert first.claim("/m") is None
    first.hold("/m", dev_r, session.fd)
    second = HolderClient(holder)
    with pytest.raises(HolderError, match="served by a running daemon"):
        second.claim("/m")
    first.close()  # the daemon dies
    held = second.claim("/m")
    assert held is not None and held.detached_for >= 0
    os.write(dev_w, b"same pipe")
    assert os.read(held.devfd, 9) == b"same pipe"
    assert SessionFile.attach(held.session_fd).takeovers == 1
    second.close()
    for fd in (dev_r, dev_w, held.devfd):
        os.close(fd)
    session.close()


def test_holder_refuses_a_hold_without_files(holder: str) -> None:
    client = HolderClient(holder)
    with pytest.raises(HolderError, match="needs the /dev/fuse and session files"):
        client._call({"op": "hold", "mount": "/m"})
    client.close()


def test_a_resent_create_recorded_by_a_daemon_that_died_twice_is_dropped(tmp_path: Path) -> None:
    """Daemon B answers a CREATE the kernel resent (``unique`` has FUSE_UNIQUE_RESEND) and
    dies between recording its handle and the reply: the kernel resends it once more, and
    daemon C must drop the handle it rebuilt from that slot, or the file keeps a writer the
    kernel never heard of and is never uploaded."""
    from cistern.cachenode.core import ROOT_INO, CacheCore
    from cistern.cachenode.fuse_splice import SpliceFrontend
    from cistern.cachenode.store import LocalDirStore
    from cistern.config import FlushPolicy

    core = CacheCore(tmp_path / "cache", LocalDirStore(tmp_path / "objects"),
                     flush=FlushPolicy(upload_delay=0.0))
    try:
        handle, attr = core.create(ROOT_INO, "ckpt.pt", 0o644, os.O_WRONLY, 0, 0)
        core.write(handle, 0, b"x" * 100)
        core.release(handle)  # the application closed it long ago
        old = SessionFile.create(INIT)
        resent = 1234 | kf.FUSE_UNIQUE_RESEND
        old.confirm(old.reserve(attr.ino, os.O_WRONLY, 0, False), unique=resent)
        session = SessionFile.attach(os.dup(old.fd))
        old.close()  # daemon B's copy

        new = SpliceFrontend()
        new._bind(core, str(tmp_path / "mnt"))
        new._session = session
        new._restore_handles(session)
        assert core.collect_work(10, force=True) == []  # a writer: not uploaded yet
        new._on_resent(kf.CREATE, resent)  # the kernel never got that handle
        assert session.in_use() == 0
        assert [work.ino for work in core.collect_work(10, force=True)] == [attr.ino]
        session.close()
    finally:
        core.close()

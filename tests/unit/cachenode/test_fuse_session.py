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

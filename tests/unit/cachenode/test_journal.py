"""The metadata journal on its own: what is committed is what a restart loads."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from cistern.cachenode.journal import CLEAN, DIR, DIRTY, Entry, Journal, UploadIntent


def _file(name: str, parent: int = 1, ino: int = 0, size: int = 5) -> Entry:
    return Entry(ino=ino, parent=parent, name=name, is_dir=False, mode=0o100644, uid=1,
                 gid=2, size=size, mtime_ns=10, ctime_ns=11, state=DIRTY, local=True)


def _persistent(entry: Entry) -> tuple[object, ...]:
    return entry.row()


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "journal.sqlite"


def test_entries_survive_close_and_reopen(path: Path) -> None:
    journal = Journal(path)
    root = Entry(ino=1, parent=0, name="", is_dir=True, mode=0o40755, uid=0, gid=0, size=0,
                 mtime_ns=1, ctime_ns=1, state=DIR, local=True)
    assert journal.insert(root) == 1
    entry = _file("a.bin")
    entry.ino = journal.insert(entry)
    assert entry.ino > 1
    entry.state, entry.remote_key, entry.remote_size = CLEAN, "prefix/a.bin", 5
    entry.writers = 3  # runtime only: never journaled
    journal.update(entry)
    journal.close()

    loaded = {e.ino: e for e in Journal(path).load()}
    assert set(loaded) == {1, entry.ino}
    assert _persistent(loaded[entry.ino]) == _persistent(entry)
    assert loaded[entry.ino].writers == 0 and loaded[1].is_dir


def test_delete_and_the_unique_name_per_directory(path: Path) -> None:
    journal = Journal(path)
    ino = journal.insert(_file("x"))
    with pytest.raises(sqlite3.IntegrityError):
        journal.insert(_file("x"))
    assert journal.insert(_file("x", parent=7)) != ino  # same name, another directory
    journal.delete(ino)
    assert [e.name for e in journal.load()] == ["x"]
    assert journal.insert(_file("x")) != ino  # AUTOINCREMENT: a deleted ino is not reused


def test_a_failed_transaction_leaves_nothing(path: Path) -> None:
    journal = Journal(path)
    with pytest.raises(RuntimeError), journal.transaction():
        journal.insert(_file("one"))
        with journal.transaction():  # nested: joins the outer transaction
            journal.insert(_file("two"))
            journal.add_tombstone("k")
        raise RuntimeError("crash in the middle")
    assert journal.load() == [] and journal.tombstones() == set()
    with journal.transaction():
        journal.insert(_file("one"))
        with journal.transaction():
            journal.insert(_file("two"))
    assert sorted(e.name for e in Journal(path).load()) == ["one", "two"]


def test_reserved_inos_are_consecutive_and_never_handed_out_again(path: Path) -> None:
    journal = Journal(path)
    before = journal.insert(_file("before"))
    first = journal.reserve_inos(4)
    assert first == before + 1
    assert journal.insert(_file("after")) == first + 4
    journal.close()
    again = Journal(path)
    assert again.reserve_inos(1) == first + 5  # the sequence is journaled too
    assert Journal(path.with_name("fresh.sqlite")).reserve_inos(2) == 1


def test_tombstones_and_upload_intents_persist(path: Path) -> None:
    journal = Journal(path)
    journal.add_tombstone("a/b")
    journal.add_tombstone("a/b")  # idempotent
    journal.add_tombstone("c")
    journal.remove_tombstone("c")
    journal.add_upload(5, "k1")
    journal.set_upload_id(5, "k1", "mpu-1")
    journal.add_upload(6, "k2")
    journal.add_upload(7, "k3")
    journal.remove_upload(7, "k3")
    journal.close()
    reopened = Journal(path)
    assert reopened.tombstones() == {"a/b"}
    assert sorted(reopened.uploads(), key=lambda u: u.ino) == [
        UploadIntent(5, "k1", "mpu-1"), UploadIntent(6, "k2", None)]
    reopened.add_upload(5, "k1")  # a new attempt forgets the old multipart id
    assert UploadIntent(5, "k1", None) in reopened.uploads()


def test_committed_changes_survive_a_process_that_dies_without_closing(path: Path) -> None:
    """kill -9 of the daemon: no close(), no checkpoint; the WAL holds the commits."""
    script = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "from cistern.cachenode.journal import DIRTY, Entry, Journal\n"
        "j = Journal(Path(sys.argv[1]))\n"
        "for name in ('a', 'b'):\n"
        "    j.insert(Entry(ino=0, parent=1, name=name, is_dir=False, mode=0o100644, uid=0,\n"
        "                   gid=0, size=1, mtime_ns=1, ctime_ns=1, state=DIRTY, local=True))\n"
        "j.add_tombstone('gone')\n"
        "j.sync()\n"
        "os._exit(0)\n"
    )
    subprocess.run([sys.executable, "-c", script, str(path)], check=True, timeout=60,
                   env=os.environ)
    assert Path(f"{path}-wal").exists()  # nothing checkpointed it: recovery reads the WAL
    journal = Journal(path)
    assert sorted(e.name for e in journal.load()) == ["a", "b"]
    assert journal.tombstones() == {"gone"}


def test_sync_without_a_wal_is_a_no_op(path: Path) -> None:
    journal = Journal(path)
    journal.close()  # checkpoint(TRUNCATE): the WAL is empty or gone
    Path(f"{path}-wal").unlink(missing_ok=True)
    Journal.sync(journal)  # must not raise on a missing WAL

"""The journal: what it stores survives a reopen, transactions are all or nothing."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from cistern.cachenode.journal import CLEAN, DIRTY, Entry, Journal


def _file(name: str, parent: int = 1, **fields: object) -> Entry:
    values: dict[str, object] = dict(ino=0, parent=parent, name=name, is_dir=False,
                                     mode=0o100644, uid=1, gid=2, size=3, mtime_ns=4,
                                     ctime_ns=5, state=DIRTY, local=True)
    values.update(fields)
    return Entry(**values)  # type: ignore[arg-type]


def test_entries_round_trip_through_a_reopen(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.sqlite")
    ino = journal.insert(_file("a", remote_key="a", remote_size=3, meta_dirty=True))
    entry = _file("a", ino=ino, state=CLEAN, remote_key="a", remote_size=3, meta_dirty=True)
    entry.size, entry.gen, entry.writers = 9, 7, 1  # runtime fields are not persisted
    journal.update(entry)
    journal.close()
    (loaded,) = Journal(tmp_path / "j.sqlite").load()
    assert (loaded.ino, loaded.name, loaded.state, loaded.size, loaded.remote_key,
            loaded.meta_dirty) == (ino, "a", CLEAN, 9, "a", True)
    assert (loaded.gen, loaded.writers, loaded.fd) == (0, 0, -1)


def test_a_failed_transaction_leaves_nothing_behind(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.sqlite")
    journal.insert(_file("kept"))
    with pytest.raises(RuntimeError), journal.transaction():
        journal.insert(_file("lost"))
        journal.add_tombstone("lost-key")
        with journal.transaction():  # nested: joins the outer one
            journal.add_upload(5, "lost-key")
        raise RuntimeError("crash in the middle")
    assert [e.name for e in journal.load()] == ["kept"]
    assert journal.tombstones() == set() and journal.uploads() == []


def test_names_are_unique_per_directory(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.sqlite")
    journal.insert(_file("same"))
    journal.insert(_file("same", parent=2))
    with pytest.raises(sqlite3.IntegrityError):
        journal.insert(_file("same"))


def test_reserved_inodes_are_never_handed_out_again(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.sqlite")
    first = journal.reserve_inos(10)
    before = journal.insert(_file("x"))
    assert before >= first + 10
    journal.delete(before)
    journal.close()
    reopened = Journal(tmp_path / "j.sqlite")
    again = reopened.reserve_inos(5)
    after = reopened.insert(_file("y"))
    assert again > before and after >= again + 5


def test_tombstones_and_upload_intents(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.sqlite")
    journal.add_tombstone("old")
    journal.add_tombstone("old")  # idempotent
    journal.add_upload(7, "k")
    journal.set_upload_id(7, "k", "upload-1")
    journal.close()
    journal = Journal(tmp_path / "j.sqlite")
    assert journal.tombstones() == {"old"}
    (intent,) = journal.uploads()
    assert (intent.ino, intent.key, intent.upload_id) == (7, "k", "upload-1")
    journal.remove_upload(7, "k")
    journal.remove_tombstone("old")
    assert journal.uploads() == [] and journal.tombstones() == set()


def test_commits_go_to_the_wal_and_a_new_connection_sees_them(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.sqlite")
    journal.insert(_file("a"))
    wal = tmp_path / "j.sqlite-wal"
    assert wal.stat().st_size > 0  # WAL mode: the commit went to the log
    journal.sync()  # fsyncs the WAL; the row stays committed
    # A second connection (another process after a crash) sees the committed row.
    other = sqlite3.connect(tmp_path / "j.sqlite")
    assert other.execute("SELECT name FROM entries").fetchall() == [("a",)]
    other.close()


def test_committed_changes_survive_a_process_that_dies_without_closing(tmp_path: Path) -> None:
    """kill -9 of the daemon: no close(), no checkpoint; recovery reads the WAL."""
    path = tmp_path / "j.sqlite"
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
    assert Path(f"{path}-wal").exists()  # nothing checkpointed it
    journal = Journal(path)
    assert sorted(e.name for e in journal.load()) == ["a", "b"]
    assert journal.tombstones() == {"gone"}


def test_a_new_upload_attempt_forgets_the_old_multipart_id(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.sqlite")
    journal.add_upload(7, "k")
    journal.set_upload_id(7, "k", "upload-1")
    journal.add_upload(7, "k")
    (intent,) = journal.uploads()
    assert intent.upload_id is None


_LOG_AND_DIE = (
    "import os, sys\n"
    "from pathlib import Path\n"
    "from cistern.cachenode.journal import DIRTY, Entry, Journal\n"
    "j = Journal(Path(sys.argv[1]))\n"
    "first = j.reserve_inos(10)\n"
    "for i, name in enumerate(('a', 'b', 'c')):\n"
    "    j.log_insert(Entry(ino=first + i, parent=1, name=name, is_dir=False, mode=0o100644,\n"
    "                       uid=0, gid=0, size=0, mtime_ns=1, ctime_ns=1, state=DIRTY,\n"
    "                       local=True))\n"
    "    if name == 'a':\n"
    "        j.apply_intents()  # 'a' in SQLite, 'b' and 'c' only in the intent log\n"
    "os._exit(0)\n"
)


def _log_and_die(path: Path) -> None:
    """kill -9 of the daemon right after three creates were acknowledged."""
    subprocess.run([sys.executable, "-c", _LOG_AND_DIE, str(path)], check=True, timeout=60,
                   env=os.environ)


def test_creates_in_the_intent_log_survive_a_process_that_dies(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite"
    _log_and_die(path)
    journal = Journal(path)
    assert sorted(e.name for e in journal.load()) == ["a", "b", "c"]
    journal.close()
    # Replayed once, kept once: a second open neither loses nor duplicates them.
    reopened = Journal(path)
    assert sorted(e.name for e in reopened.load()) == ["a", "b", "c"]


def test_a_torn_intent_log_tail_is_ignored_and_later_statements_keep_their_order(
        tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite"
    _log_and_die(path)
    logs = [Path(f"{path}-intents.{i}") for i in (0, 1)]
    active = max(logs, key=lambda p: p.stat().st_size)  # 'b' and 'c' went to this one
    data = active.read_bytes()
    active.write_bytes(data[:-3])  # a power cut tore the last record ('c')
    journal = Journal(path)
    entries = {e.name: e for e in journal.load()}
    assert sorted(entries) == ["a", "b"]
    # A create, then a change of the same entry: the change finds the row in SQLite.
    first = journal.reserve_inos(1)
    journal.log_insert(_file("d", ino=first))
    journal.update(_file("d", ino=first, size=42))
    journal.delete(entries["b"].ino)
    journal.close()
    assert {e.name: e.size for e in Journal(path).load()} == {"a": 0, "d": 42}


def test_stale_intent_records_are_not_applied_twice(tmp_path: Path) -> None:
    """A truncation of the log that never reached the disk leaves applied records behind:
    their sequence numbers are at or below the one SQLite holds, so they are skipped."""
    path = tmp_path / "j.sqlite"
    journal = Journal(path)
    first = journal.reserve_inos(2)
    journal.log_insert(_file("x", ino=first))
    logs = [Path(f"{path}-intents.{i}") for i in (0, 1)]
    saved = {p: p.read_bytes() for p in logs}
    journal.apply_intents()
    journal.delete(first)  # x is gone for good
    journal.close()
    for p, data in saved.items():  # the log as it was before it was applied and emptied
        p.write_bytes(data)
    assert Journal(path).load() == []

"""The direct-path study's follower (bench/direct_follow.py) on real fanotify, XFS and moto.

What the study's figures rest on: a file closed after writing is uploaded from a reflink
snapshot, a rename moves the object, a delete removes it, and a follower started on the same
journal after a stop (a restart; a power cut looks the same to it) uploads what changed
meanwhile and deletes what disappeared.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bench.direct_follow import Follower
from bench.direct_study import LoopXfs
from tests.support.powercut.blockdev import missing_capability
from tests.support.wait import wait_until


def _objects(s3: Any, bucket: str) -> dict[str, bytes]:
    """Key -> content; a key deleted between the listing and its GET is left out."""
    found = {}
    for listed in s3.list_objects_v2(Bucket=bucket).get("Contents", []):
        try:
            found[listed["Key"]] = s3.get_object(Bucket=bucket, Key=listed["Key"])["Body"].read()
        except s3.exceptions.NoSuchKey:
            continue
    return found


@pytest.mark.timeout(120)
@pytest.mark.parametrize("legacy_renames", [False, True], ids=["fan_rename", "moved_from_to"])
def test_follower_uploads_closed_files_follows_names_and_rescans_after_restart(
        tmp_path: Path, s3: Any, bucket: str, legacy_renames: bool) -> None:
    reason = missing_capability()
    if reason:
        pytest.skip(reason)
    with LoopXfs(tmp_path / "xfs.img", tmp_path / "xfs", 512 << 20) as xfs:
        state, root = xfs.path / "state", xfs.path / "cache"
        state.mkdir()
        (root / "d").mkdir(parents=True)
        follower = Follower(str(root), str(state), s3, bucket, "p/",
                            legacy_renames=legacy_renames).start()
        try:
            (root / "d" / "a").write_bytes(b"first")
            wait_until(lambda: _objects(s3, bucket) == {"p/d/a": b"first"}, 30,
                       "the closed file uploaded")
            (root / "d" / "a").rename(root / "d" / "b")
            wait_until(lambda: _objects(s3, bucket) == {"p/d/b": b"first"}, 30,
                       "the rename followed")
            (root / "d").rename(root / "e")  # a directory: its files move with it
            wait_until(lambda: _objects(s3, bucket) == {"p/e/b": b"first"}, 30,
                       "the directory rename followed")
            (root / "e").rename(root / "d")
            wait_until(lambda: _objects(s3, bucket) == {"p/d/b": b"first"}, 30,
                       "the directory renamed back")
            (root / "gone").write_bytes(b"x")
            (root / "stale").write_bytes(b"s")
            wait_until(lambda: {"p/gone", "p/stale"} <= set(_objects(s3, bucket)), 30,
                       "two more files")
            (root / "gone").unlink()
            wait_until(lambda: "p/gone" not in _objects(s3, bucket), 30, "the delete followed")
            assert not follower.failed
            assert follower.wait_idle(30)
        finally:
            follower.stop()
        # While no follower runs: a rewrite, a new file, a delete. The next one's scan sees all.
        (root / "d" / "b").write_bytes(b"second")
        (root / "new").write_bytes(b"n")
        (root / "stale").unlink()
        restarted = Follower(str(root), str(state), s3, bucket, "p/")
        try:
            assert restarted.scan() == 2  # b (changed) and new; stale's object is deleted
            restarted.start()
            wait_until(lambda: _objects(s3, bucket) == {"p/d/b": b"second", "p/new": b"n"}, 30,
                       "the restart uploaded what changed")
            assert list(state.joinpath("snapshots").iterdir()) == []
        finally:
            restarted.stop()

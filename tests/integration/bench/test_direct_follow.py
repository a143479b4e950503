"""The direct-path study (bench/direct_follow.py, bench/direct_study.py) on real fanotify, XFS
and moto.

What the study's figures rest on: a file closed after writing is uploaded from a reflink
snapshot, a rename moves the object, a delete removes it, and a follower started on the same
journal after a stop (a restart; the prototype treats a power cut the same way, and
docs/dev/direct.md says what a product must add) uploads what changed meanwhile and deletes
what disappeared.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.direct_follow import Follower
from bench.direct_study import LoopXfs
from tests.support.powercut.blockdev import missing_capability
from tests.support.wait import wait_until

REPO_ROOT = Path(__file__).resolve().parents[3]


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


@pytest.mark.timeout(180)
def test_the_study_runs_end_to_end_and_reports_every_target(tmp_path: Path) -> None:
    """``make bench-direct`` in miniature (no Cistern mounts): the command the integrator
    re-runs keeps working, and the followed directory's file reaches the store."""
    reason = missing_capability()
    if reason:
        pytest.skip(reason)
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.direct_study", "--reps", "1", "--fio-size",
         str(16 << 20), "--frontends", "", "--out", str(out), "--workdir", str(tmp_path)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    data = json.loads((out / "results.json").read_text())
    assert set(data["results"]) == {"raw-ext4", "raw-xfs", "direct-xfs"}
    assert all(rows[0]["bw_mib_s"] > 0 for rows in data["results"].values())
    assert data["results"]["direct-xfs"][0]["durable_after_close_s"] >= 0
    assert data["follower"]["overflows"] == 0 and data["follower"]["uploads"] >= 2
    assert "direct-xfs" in (out / "results.md").read_text()

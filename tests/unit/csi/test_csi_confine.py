"""Walking a volume path below a root without following symlinks (a plain directory tree
stands in for the cache mount: the walk is the same system calls on any file system)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cistern.csi.confine import ConfinementError, fd_path, open_beneath


def test_creates_missing_components_with_the_exact_mode(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        fd = open_beneath(str(tmp_path), "team/run-1", create_mode=0o777)
    finally:
        os.umask(old)
    try:
        assert os.path.realpath(fd_path(fd)) == str(tmp_path / "team" / "run-1")
    finally:
        os.close(fd)
    for path in (tmp_path / "team", tmp_path / "team" / "run-1"):
        assert path.is_dir() and path.stat().st_mode & 0o777 == 0o777
    # Existing directories are opened as they are; their mode is not touched.
    (tmp_path / "kept").mkdir(mode=0o750)
    os.close(open_beneath(str(tmp_path), "kept", create_mode=0o777))
    assert (tmp_path / "kept").stat().st_mode & 0o777 == 0o750


def test_refuses_symlinks_anywhere_in_the_path(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "evil").symlink_to(outside)
    (root / "a").mkdir()
    (root / "a" / "b").symlink_to("../../outside")
    for relative in ("evil", "evil/sub", "a/b", "a/b/c"):
        with pytest.raises(ConfinementError, match="symlinks are refused"):
            open_beneath(str(root), relative, create_mode=0o777)
    assert list(outside.iterdir()) == []  # nothing was created through a symlink


def test_refuses_files_and_bad_components(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfinementError):
        open_beneath(str(tmp_path), "file/sub", create_mode=0o777)
    for relative in ("a/../b", "./a", "a//b"):
        with pytest.raises(ConfinementError):
            open_beneath(str(tmp_path), relative)
    with pytest.raises(FileNotFoundError):
        open_beneath(str(tmp_path), "missing")  # no create_mode: nothing is created
    assert not (tmp_path / "missing").exists() and not (tmp_path / "a").exists()

"""Fixtures of the power-cut tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from support.powercut.blockdev import CacheDevice


@pytest.fixture
def device(tmp_path: Path) -> Iterator[CacheDevice]:
    """A cache device of its own (loop-mounted ext4 on a reflink-capable xfs) for one test;
    its cuts are recoverable until the test ends."""
    with CacheDevice(tmp_path / "dev") as cache_device:
        yield cache_device

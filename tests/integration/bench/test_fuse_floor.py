"""bench.fuse_floor end to end: a C libfuse server and cistern-node measured in one batch."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[3]


def _missing() -> str | None:
    if not Path("/dev/fuse").exists():
        return "no /dev/fuse on this machine"
    for tool in ("gcc", "pkg-config", "fusermount3"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (scripts/install.sh installs it)"
    if subprocess.run(["pkg-config", "--exists", "fuse3"]).returncode != 0:
        return "libfuse3-dev is not installed (scripts/install.sh installs it)"
    return None


@pytest.mark.timeout(180)
def test_fuse_floor_measures_both_servers_and_leaves_nothing(tmp_path: Path) -> None:
    reason = _missing()
    if reason:
        pytest.skip(reason)
    out, work = tmp_path / "floor.json", tmp_path / "work"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.fuse_floor", "--files", "200", "--iterations", "300",
         "--workdir", str(work), "--out", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    figures = json.loads(out.read_text())
    for key in ("c_lookup_rt_us", "cistern_lookup_rt_us", "raw_cp_per_file_us",
                "cistern_cp_per_file_us", "floor_cp_per_file_us"):
        assert figures[key] > 0, key
    fastest = min(figures["c_lookup_rt_us"], figures["cistern_lookup_rt_us"])
    assert figures["floor_cp_per_file_us"] == pytest.approx(
        3 * fastest + figures["raw_cp_per_file_us"])
    assert "floor for any FUSE file system" in proc.stdout
    assert list(work.iterdir()) == []  # mounts unmounted, copies removed


def test_fuse_floor_help() -> None:
    proc = subprocess.run([sys.executable, "-m", "bench.fuse_floor", "--help"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "round trip" in proc.stdout

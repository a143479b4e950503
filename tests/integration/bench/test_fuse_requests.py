"""bench.fuse_requests end to end: the requests a cp -r sends per new file, counted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cistern.cachenode.fuse_passthrough import probe_passthrough

REPO_ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.timeout(180)
def test_counts_the_requests_of_each_new_file(tmp_path: Path) -> None:
    works, why = probe_passthrough()
    if not works:
        pytest.skip(f"kernel FUSE passthrough unavailable on this machine: {why}")
    out, work = tmp_path / "requests.json", tmp_path / "work"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.fuse_requests", "--files", "200", "--rounds", "1",
         "--workdir", str(work), "--out", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (result,) = json.loads(out.read_text())
    sent = result["requests_per_file"]
    # A negative LOOKUP, the CREATE, a GETATTR of the directory, and the RELEASE; no FLUSH in
    # write-back mode (FOPEN_NOFLUSH) and the data never reaches the daemon (passthrough).
    for name in ("LOOKUP", "CREATE", "GETATTR", "RELEASE"):
        assert 0.9 <= sent[name] <= 1.2, (name, sent)
        assert result["handler_us"][name] > 0
    assert "FLUSH" not in sent and "WRITE" not in sent, sent
    assert set(result["core_us"]) == {"core.find", "core.create", "core.getattr",
                                      "core.release"}
    assert list(work.iterdir()) == []  # unmounted and removed

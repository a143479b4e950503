"""The benchmark harness end to end in its smoke configuration (no assertions on speed)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[3]


def _missing() -> str | None:
    if shutil.which("fio") is None:
        return "fio is not installed (apt-get install fio)"
    if not Path("/dev/fuse").exists():
        return "no /dev/fuse on this machine"
    try:
        import torch  # noqa: F401
    except ImportError:
        return "torch is not installed (pip install torch==2.13.0)"
    return None


@pytest.mark.timeout(300)
def test_bench_smoke_writes_well_formed_results(tmp_path: Path) -> None:
    reason = _missing()
    if reason:
        pytest.skip(reason)
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--out", str(out),
         "--workdir", str(tmp_path / "work")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]

    data = json.loads((out / "results.json").read_text())
    assert data["config"]["profile"] == "smoke"
    assert data["machine"]["cores"] >= 1
    assert "raw" in data["targets"] and data["targets"]["raw"]["available"]
    cistern = {n: t for n, t in data["targets"].items() if n.startswith("cistern-")}
    assert set(cistern) == {"cistern-pyfuse3", "cistern-passthrough", "cistern-splice"}
    for name, target in data["targets"].items():
        assert target["available"] or target["reason"], name  # never silently dropped

    raw = data["summary"]["raw"]
    for metric in ("fio1j_bw_mib_s", "fio4j_clat_p99_ms", "dcp_stall_s", "torchsave_stall_s",
                   "dcp_read_after_write_s", "dcp_cold_read_s", "smallfiles_cp_s"):
        assert raw[metric]["median"] > 0, metric
        assert raw[metric]["ratio_to_raw"] == pytest.approx(1.0), metric
    measured = [n for n, t in cistern.items() if t["available"]]
    for name in measured:
        assert not data["errors"][name], data["errors"][name]
        summary = data["summary"][name]
        for metric in ("dcp_stall_s", "dcp_durable_s", "torchsave_durable_s",
                       "dcp_cold_read_s", "fio1j_bw_mib_s"):
            assert summary[metric]["median"] > 0, (name, metric)
            assert summary[metric]["ratio_to_raw"] > 0, (name, metric)
        # a DCP save writes several shards and the .metadata commit marker as objects
        assert data["requests"][name]["dcp"]["PUT"] + \
            data["requests"][name]["dcp"]["COMPLETE_MPU"] >= 2
        # issue 16's split of time to durable (from the proxy's log) and the CPU columns
        assert summary["dcp_acked_s"]["median"] > 0, name
        assert summary["dcp_nodecpu_s"]["median"] > 0, name
        assert summary["dcp_storecpu_s"]["median"] > 0, name

    table = (out / "results.md").read_text()
    header = next(line for line in table.splitlines() if line.startswith("| metric |"))
    assert header.split("|")[2].strip() == "raw"
    for name in measured:
        assert name in header
    assert "DCP save: writer stall" in table
    assert "S3 requests per checkpoint save" in table
    _check_s3api_workload(data, table)
    png = out / "results.png"
    if png.exists():
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.timeout(200)
def test_bench_small_files_phase_alone(tmp_path: Path) -> None:
    """``--workloads smallfiles``: only the cp -r phase, every repetition measured, nothing
    left behind in the work directory. One front end is enough here (the smoke run above
    copies small files through each); 120 files still fill two folders of 100."""
    reason = _missing()
    if reason:
        pytest.skip(reason)
    out, work = tmp_path / "results", tmp_path / "work"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--targets", "raw,cistern", "--frontends",
         "pyfuse3", "--workloads", "smallfiles", "--small-files", "120",
         "--reps", "2", "--out", str(out), "--workdir", str(work)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((out / "results.json").read_text())
    assert data["config"]["workloads"] == ["smallfiles"]
    for name, target in data["targets"].items():
        if not target["available"]:
            continue
        assert not data["errors"][name], data["errors"][name]
        assert set(data["summary"][name]) == {"smallfiles_cp_s"}, name
        runs = data["summary"][name]["smallfiles_cp_s"]["runs"]
        assert len(runs) == 2 and all(r > 0 for r in runs), (name, runs)
    assert data["summary"]["raw"]["smallfiles_cp_s"]["ratio_to_raw"] == pytest.approx(1.0)
    assert list(work.iterdir()) == []  # copies, caches and mounts are all gone


def test_bench_rejects_unknown_workloads() -> None:
    proc = subprocess.run([sys.executable, "-m", "bench", "--workloads", "fio,nope"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "unknown: nope" in proc.stderr


def _check_s3api_workload(data: dict[str, Any], table: str) -> None:
    """The s3api workload of the smoke run: an S3Checkpoint save straight to S3 and one
    through a node's S3 endpoint, side by side (no assertions on speed)."""
    for name in ("s3-direct", "s3-via-cistern"):
        assert data["targets"][name]["available"], data["targets"][name]
        assert not data["errors"][name], data["errors"][name]
        for metric in ("s3ckpt_stall_s", "s3ckpt_durable_s"):
            assert data["summary"][name][metric]["median"] > 0, (name, metric)
    # Straight to S3 the client itself uploads; through the node the flusher does, once.
    direct = data["requests"]["s3-direct"]["s3ckpt"]
    node = data["requests"]["s3-via-cistern"]["s3ckpt"]
    assert direct["PUT"] + direct["COMPLETE_MPU"] >= 1
    assert node["PUT"] + node["COMPLETE_MPU"] == 1
    assert "S3Checkpoint save (S3 API): writer stall" in table


@pytest.mark.timeout(300)
def test_bench_dlio_phase_reports_write_read_and_durability(tmp_path: Path) -> None:
    """The MLPerf-shaped checkpointing phase at tiny size: raw disk and Cistern (passthrough)
    in one batch, every figure present; the checkpoints reach the bucket."""
    reason = _missing()
    if reason:
        pytest.skip(reason)
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--workloads", "dlio",
         "--frontends", "passthrough", "--out", str(out), "--workdir", str(tmp_path / "work")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((out / "results.json").read_text())
    measured = [n for n, t in data["targets"].items() if t["available"]]
    assert "raw" in measured
    for name in measured:
        summary = data["summary"][name]
        assert not data["errors"][name], data["errors"][name]
        for metric in ("dlio_write_gib_s", "dlio_read_gib_s", "dlio_durable_s"):
            assert summary[metric]["median"] > 0, (name, metric, data["notes"].get(name))
    assert "MLPerf-shaped checkpointing" in (out / "results.md").read_text()

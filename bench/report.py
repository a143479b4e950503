"""Medians, ratios to raw disk, and the JSON / Markdown / PNG outputs of a run."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.runner import BenchRun
from tests.support.faultproxy import KINDS

# metric suffix -> (label, unit, higher is better)
_METRIC_KINDS: dict[str, tuple[str, str, bool]] = {
    "bw_mib_s": ("bandwidth", "MiB/s", True),
    "clat_p50_ms": ("completion latency p50", "ms", False),
    "clat_p99_ms": ("completion latency p99", "ms", False),
    "wall_s": ("wall time incl. end fsync", "s", False),
    "stall_s": ("writer stall (save call blocks)", "s", False),
    "durable_s": ("time until durable in S3 (from save start)", "s", False),
    "acked_s": ("last part/PUT acknowledged, before the Complete (from save start)", "s", False),
    "completed_s": ("CompleteMultipartUpload returned (from save start)", "s", False),
    "nodecpu_s": ("CPU of the cache's processes, save + upload", "s", False),
    "storecpu_s": ("CPU of the S3 server (moto), save + upload", "s", False),
    "read_after_write_s": ("read-after-write load", "s", False),
    "cold_read_s": ("cold-restart load (empty cache)", "s", False),
    "cp_s": ("cp -r of the small files", "s", False),
    "write_gib_s": ("checkpoint write", "GiB/s", True),
    "read_gib_s": ("checkpoint read", "GiB/s", True),
}
_WORKLOADS = {"dcp": "DCP save", "torchsave": "torch.save+rename", "smallfiles": "small files",
              "s3ckpt": "S3Checkpoint save (S3 API)",
              "dlio": "MLPerf-shaped checkpointing (Llama 3 8B, scaled)"}


def metric_label(name: str) -> tuple[str, str, bool]:
    prefix, _, rest = name.partition("_")
    for suffix, (label, unit, higher) in _METRIC_KINDS.items():
        if rest == suffix:
            if prefix.startswith("fio"):
                jobs = prefix[3:].rstrip("j")
                title = f"fio 256 KiB seq write, {jobs} job{'s' if jobs != '1' else ''}"
            elif prefix == "smallfiles":
                title = "small files"
            else:
                title = _WORKLOADS.get(prefix, prefix)
            return f"{title}: {label}", unit, higher
    return name, "", False


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def summarize(run: BenchRun) -> dict[str, Any]:
    """Medians per target and metric, with the ratio to raw disk's median."""
    summary: dict[str, dict[str, Any]] = {}
    for name, reps in run.runs.items():
        per_metric: dict[str, list[float | None]] = {}
        for rep in reps:
            metrics = dict(rep.metrics)
            if name == "raw":  # a fsynced local save is durable when the call returns
                for kind in ("dcp", "torchsave"):
                    if metrics.get(f"{kind}_stall_s") is not None:
                        metrics[f"{kind}_durable_s"] = metrics[f"{kind}_stall_s"]
            for metric, value in metrics.items():
                per_metric.setdefault(metric, []).append(value)
        summary[name] = {m: {"runs": v, "median": _median(v)} for m, v in per_metric.items()}
    raw = summary.get("raw", {})
    for target_summary in summary.values():
        for metric, entry in target_summary.items():
            base = raw.get(metric, {}).get("median")
            value = entry["median"]
            entry["ratio_to_raw"] = (value / base) if value is not None and base else None
    return summary


def request_medians(run: BenchRun) -> dict[str, dict[str, dict[str, float]]]:
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name, reps in run.runs.items():
        by_workload: dict[str, list[dict[str, int]]] = {}
        for rep in reps:
            for workload, counts in rep.requests.items():
                by_workload.setdefault(workload, []).append(counts)
        out[name] = {
            workload: {k: statistics.median(c.get(k, 0) for c in counts)
                       for k in (*KINDS, "THROTTLED")}
            for workload, counts in by_workload.items()
        }
    return out


def _first_line(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    lines = (out.stdout or out.stderr).strip().splitlines()
    return lines[0] if lines else "unknown"


def machine_info(workdir: str | None) -> dict[str, Any]:
    cpu = "unknown"
    with open("/proc/cpuinfo") as handle:
        for line in handle:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    where = workdir or os.environ.get("TMPDIR", "/tmp")
    fs = _first_line(["findmnt", "-n", "-o", "SOURCE,FSTYPE", "-T", where])
    try:
        import torch
        torch_version = str(torch.__version__)
    except ImportError:
        torch_version = "not installed"
    return {
        "cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem_kib / (1 << 20), 1),
        "kernel": platform.release(), "os": _first_line(["sh", "-c", ". /etc/os-release; "
                                                          "echo $PRETTY_NAME"]),
        "python": platform.python_version(), "torch": torch_version,
        "fio": _first_line(["fio", "--version"]), "disk": f"{where}: {fs}",
        "load_average_at_start": os.getloadavg(),
    }


def to_json(run: BenchRun, command: str, machine: dict[str, Any]) -> dict[str, Any]:
    return {
        "command": command,
        "started": run.started,
        "duration_s": run.finished - run.started,
        "machine": machine,
        "config": asdict(run.config),
        "targets": run.targets,
        "summary": summarize(run),
        "requests": request_medians(run),
        "notes": {n: sorted({note for r in reps for note in r.notes})
                  for n, reps in run.runs.items()},
        "errors": {n: [r.error for r in reps if r.error] for n, reps in run.runs.items()},
        "steps": {n: [r.steps for r in reps] for n, reps in run.runs.items()},
    }


def _fmt(value: float | None) -> str:
    if value is None:
        return "n/a"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    if value >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def _dlio_sizes(cfg: dict[str, Any]) -> str:
    from bench.dlio_io import shard_bytes

    ranks, scale = int(cfg.get("dlio_ranks", 8)), float(cfg.get("dlio_scale", 400.0))
    model, optim = shard_bytes(ranks, scale)
    return (f"MLPerf-shaped checkpointing: Llama 3 8B / {scale:g}, {ranks} ranks, "
            f"{(model + optim) * ranks / (1 << 20):.0f} MiB per checkpoint, "
            f"{cfg.get('dlio_writes')} written, {cfg.get('dlio_reads')} read")


def to_markdown(data: dict[str, Any]) -> str:
    summary: dict[str, dict[str, Any]] = data["summary"]
    names = [n for n, t in data["targets"].items() if t["available"] and summary.get(n)]
    metrics: list[str] = []
    for name in names:
        for metric in summary[name]:
            if metric not in metrics:
                metrics.append(metric)
    cfg = data["config"]
    ran = cfg.get("workloads", ["fio", "checkpoints", "smallfiles"])
    sizes = {
        "fio": f"fio {cfg['fio_size'] / (1 << 20):g} MiB per run",
        "checkpoints": f"checkpoints of {cfg['model_size'] / (1 << 20):g} MiB "
                       f"({cfg['tensors']} tensors)",
        "smallfiles": f"{cfg['small_files']} small files of {cfg['small_file_size']} B",
        "s3api": f"S3Checkpoint saves of {cfg.get('s3api_size', 0) / (1 << 20):g} MiB",
        "dlio": _dlio_sizes(cfg),
    }
    lines = [
        f"Profile `{cfg['profile']}`, {cfg['reps']} repetition(s), medians; "
        f"S3 latency {cfg['latency_ms']:g} ms per request, 503 rate {cfg['error_rate']:g}; "
        + "; ".join(sizes[w] for w in ran if w in sizes) + ". "
        "In parentheses: ratio to raw disk in the same batch (for bandwidth higher is "
        "better, for everything else lower is better). Run took "
        f"{data['duration_s'] / 60:.1f} min.",
        "",
        "| metric | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for metric in metrics:
        label, unit, _higher = metric_label(metric)
        cells = []
        for name in names:
            entry = summary[name].get(metric)
            if entry is None or entry["median"] is None:
                cells.append("n/a")
                continue
            ratio = entry.get("ratio_to_raw")
            cell = _fmt(entry["median"])
            if ratio is not None and name != "raw":
                cell += f" ({ratio:.2f}×)"
            cells.append(cell)
        lines.append(f"| {label} [{unit}] | " + " | ".join(cells) + " |")
    if any(data["requests"].get(name) for name in names):
        lines += ["", "S3 requests per checkpoint save (median, through the proxy):", "",
                  "| target | save | " + " | ".join(KINDS) + " | THROTTLED |",
                  "|---|---|" + "---|" * (len(KINDS) + 1)]
    for name in names:
        for workload, counts in data["requests"].get(name, {}).items():
            lines.append(f"| {name} | {_WORKLOADS.get(workload, workload)} | "
                         + " | ".join(f"{counts.get(k, 0):g}" for k in (*KINDS, "THROTTLED"))
                         + " |")
    lines += ["", "Targets:", "", "| target | status | what | version |", "|---|---|---|---|"]
    for name, target in data["targets"].items():
        status = "measured" if target["available"] else f"not measured: {target['reason']}"
        if target["available"] and not summary.get(name):
            status = "not run by the selected workloads"
        errors = data["errors"].get(name) or []
        if errors:
            status += f"; {len(errors)} failed repetition(s): {errors[0][:200]}"
        lines.append(f"| {name} | {status} | {target['description']} | {target['version']} |")
    notes = [(n, note) for n, ns in data["notes"].items() for note in ns]
    if notes:
        lines += ["", "Notes:", ""]
        lines += [f"- {name}: {note}" for name, note in notes]
    return "\n".join(lines) + "\n"


def plot(data: dict[str, Any], path: Path) -> bool:
    """Bar chart of writer stall and time-to-durable per target; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install -e '.[bench]')",
              file=sys.stderr)
        return False
    summary = data["summary"]
    names = [n for n, t in data["targets"].items() if t["available"] and summary.get(n)]
    series = [("dcp_stall_s", "DCP stall"), ("dcp_durable_s", "DCP time to durable"),
              ("torchsave_stall_s", "torch.save stall"),
              ("torchsave_durable_s", "torch.save time to durable")]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(names) + 2), 4.5))
    width = 0.8 / len(series)
    for i, (metric, label) in enumerate(series):
        values = [(summary[n].get(metric) or {}).get("median") or 0.0 for n in names]
        xs = [x + i * width for x in range(len(names))]
        ax.bar(xs, values, width, label=label)
    ax.set_xticks([x + width * (len(series) - 1) / 2 for x in range(len(names))])
    ax.set_xticklabels(names, rotation=15)
    ax.set_ylabel("seconds (median)")
    cfg = data["config"]
    ax.set_title(f"Checkpoint of {cfg['model_size'] / (1 << 20):g} MiB: writer stall and "
                 f"time until durable in S3 ({cfg['latency_ms']:g} ms/request)")
    ax.legend(fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_outputs(data: dict[str, Any], out_dir: Path, stem: str = "results") -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{stem}.json"
    json_path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    md_path = out_dir / f"{stem}.md"
    md_path.write_text(to_markdown(data))
    paths = [json_path, md_path]
    png_path = out_dir / f"{stem}.png"
    if plot(data, png_path):
        paths.append(png_path)
    return paths

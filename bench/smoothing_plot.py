"""The PNG of ``python -m bench.smoothing``: upload rate, cumulative bytes, dirty bytes and the
adaptive request rate per run, drawn from its JSON result (``--replot`` redraws it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["plot"]

MiB = 1 << 20


def _moving_average(bins: list[float], window: int) -> list[float]:
    half = window // 2
    return [sum(bins[max(0, i - half):i + half + 1]) / len(bins[max(0, i - half):i + half + 1])
            for i in range(len(bins))]


def plot(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"limited": "tab:blue", "unlimited": "tab:orange", "throttled": "tab:red",
              "throttled-unlimited": "tab:purple"}
    fig, axes = plt.subplots(4, 1, figsize=(10, 13), sharex=True)
    rate_ax, cum_ax, dirty_ax, req_ax = axes
    count_ax = req_ax.twinx()
    limit = data["config"]["limit"]
    for run in data["runs"]:
        name, color = run["name"], colors.get(run["name"], "gray")
        summary = run["summary"]
        bins = summary.get("per_second_bins") or []
        xs = [i + 0.5 for i in range(len(bins))]
        rate_ax.plot(xs, [b / MiB for b in _moving_average(bins, 5)], color=color, label=name)
        ct, total = [0.0], [0.0]
        for t, _kind, size in run["completions"]:
            ct.append(t)
            total.append(total[-1] + size / MiB)
        cum_ax.step(ct, total, where="post", color=color, label=f"{name}: S3 accepted (proxy)")
        samples = run["samples"]
        ts = [s["t"] for s in samples]
        cum_ax.step(ts, [s["uploaded"] / MiB for s in samples], where="post", color=color,
                    ls="--", lw=0.8, label=f"{name}: cistern_uploaded_bytes_total")
        cum_ax.plot(ts, [s["written"] / MiB for s in samples], color=color, ls=":", lw=1)
        dirty_ax.plot(ts, [s["dirty"] / MiB for s in samples], color=color, label=name)
        if summary.get("durable_seconds") is not None:
            for ax in (rate_ax, cum_ax, dirty_ax):
                ax.axvline(summary["durable_seconds"], color=color, ls="--", lw=0.6)
        if summary.get("error_rate"):
            req_ax.step(ts, [s["request_limit"] for s in samples], where="post", color=color,
                        label=f"{name}: request-rate limit (req/s)")
            count_ax.step(ts, [s["throttles"] for s in samples], where="post", color=color,
                          ls=":", label=f"{name}: 503s the daemon saw")
            rt = [0.0] + [t for t, _kind in run.get("rejected", [])]
            count_ax.step(rt, list(range(len(rt))), where="post", color=color, ls="-.",
                          lw=0.8, label=f"{name}: 503s the proxy sent")
    rate_ax.axhline(limit / MiB, color="black", ls="--", lw=1,
                    label=f"maxBytesPerSecond = {limit / MiB:.0f} MiB/s")
    rate_ax.set_ylabel("MiB/s")
    rate_ax.set_title("bytes S3 accepted per second (proxy log, 5 s moving average); "
                      "dashed verticals: last object durable", fontsize=10)
    rate_ax.legend(fontsize=8)
    cum_ax.set_ylabel("MiB")
    cum_ax.set_title("cumulative: S3 accepted (solid), daemon metric (dashed), "
                     "written by the application (dotted)", fontsize=10)
    cum_ax.legend(fontsize=7, ncol=2)
    dirty_ax.set_ylabel("MiB")
    dirty_ax.set_title("dirty bytes on the node (cistern_dirty_bytes)", fontsize=10)
    dirty_ax.legend(fontsize=8)
    req_ax.set_ylabel("request-rate limit (req/s, solid; 0: no limit)")
    count_ax.set_ylabel("503s, cumulative (dotted: daemon, dash-dot: proxy)")
    req_ax.set_xlabel("seconds since the writer started")
    req_ax.set_title(f"503 runs ({data['config']['error_rate'] * 100:.0f} % of requests answered "
                     "503 SlowDown): "
                     "cistern_upload_rate_limit_requests, cistern_s3_throttles_total",
                     fontsize=10)
    handles = req_ax.get_legend_handles_labels()
    more = count_ax.get_legend_handles_labels()
    if handles[0] or more[0]:
        req_ax.legend(handles[0] + more[0], handles[1] + more[1], fontsize=7, loc="upper left")
    fig.suptitle(f"Cistern upload smoothing: checkpoint burst into the mount, "
                 f"S3 latency {data['config']['latency'] * 1000:.0f} ms", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)

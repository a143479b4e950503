"""``python -m bench``: run the benchmark batch and write JSON, Markdown and a PNG plot."""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import fields, replace
from pathlib import Path

from bench.report import machine_info, to_json, write_outputs
from bench.runner import FULL, SMOKE, WORKLOADS, BenchConfig, run_bench
from cistern.logs import setup_logging

MiB = 1 << 20


def _size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    text = text.strip().lower().removesuffix("ib").removesuffix("b")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def _list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def build_config(args: argparse.Namespace) -> BenchConfig:
    cfg = BenchConfig()
    profile = "smoke" if args.smoke else args.profile
    if profile == "smoke":
        cfg = replace(cfg, **SMOKE)  # type: ignore[arg-type]
    elif profile == "full":
        cfg = replace(cfg, **FULL)  # type: ignore[arg-type]
    overrides = {
        "targets": _list(args.targets) if args.targets else None,
        "frontends": _list(args.frontends) if args.frontends else None,
        "workloads": _list(args.workloads) if args.workloads else None,
        "reps": args.reps,
        "fio_size": _size(args.fio_size) if args.fio_size else None,
        "fio_jobs": [int(j) for j in _list(args.fio_jobs)] if args.fio_jobs else None,
        "model_size": _size(args.model_size) if args.model_size else None,
        "tensors": args.tensors,
        "small_files": args.small_files,
        "s3api_size": _size(args.s3api_size) if args.s3api_size else None,
        "dlio_ranks": args.dlio_ranks,
        "dlio_scale": args.dlio_scale,
        "dlio_writes": args.dlio_writes,
        "dlio_reads": args.dlio_reads,
        "latency_ms": args.latency_ms,
        "error_rate": args.error_rate,
        "upload_delay": args.upload_delay,
        "cistern_config": args.cistern_config,
        "workdir": args.workdir,
    }
    known = {f.name for f in fields(BenchConfig)}
    given = {k: v for k, v in overrides.items() if v is not None and k in known}
    if set(given) - {"workdir"}:  # the figures no longer are the named profile's
        given["profile"] = f"{cfg.profile} with overrides"
    return replace(cfg, **given)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Checkpoint-cache benchmark: raw disk vs Cistern vs peers over a local S3 "
                    "(moto behind a 35 ms latency proxy). Writes results.{json,md,png}.")
    parser.add_argument("--profile", choices=("smoke", "default", "full"), default="default",
                        help="default: fio 512 MiB, 256 MiB checkpoints, 2,000 small files, "
                        "3 reps, all targets (< 20 min on 2 cores); full: fio 2 GiB, 1 GiB "
                        "checkpoints, 10,000 small files; smoke: tiny, 1 rep, raw + cistern")
    parser.add_argument("--smoke", action="store_true", help="same as --profile smoke")
    parser.add_argument("--out", default="bench/results", help="output directory")
    parser.add_argument("--targets", help="comma list of raw,cistern,juicefs,rclone,s3fs,boto3 "
                        "(boto3: local save, then upload_file with TransferConfig defaults)")
    parser.add_argument("--frontends",
                        help="Cistern front ends (default pyfuse3,passthrough,splice)")
    parser.add_argument("--workloads",
                        help="comma list of fio,checkpoints,smallfiles,s3api,dlio (default: all "
                        "but dlio)")
    parser.add_argument("--reps", type=int, help="repetitions (default 3)")
    parser.add_argument("--fio-size", help="bytes per fio run, e.g. 2G")
    parser.add_argument("--fio-jobs", help="fio job counts, e.g. 1,4 (default 1,4)")
    parser.add_argument("--model-size", help="checkpoint tensor bytes, e.g. 1G")
    parser.add_argument("--tensors", type=int, help="tensors per checkpoint (default 16)")
    parser.add_argument("--small-files", type=int, help="files for cp -r")
    parser.add_argument("--s3api-size", help="tensor bytes of the s3api workload's "
                        "S3Checkpoint save, e.g. 1G (default 1 GiB; smoke 8 MiB)")
    parser.add_argument("--dlio-ranks", type=int, help="dlio: rank processes (default 8)")
    parser.add_argument("--dlio-scale", type=float, help="dlio: divide the Llama 3 8B "
                        "checkpoint's bytes by this (default 400: ~268 MiB per checkpoint)")
    parser.add_argument("--dlio-writes", type=int, help="dlio: checkpoints written (default 3)")
    parser.add_argument("--dlio-reads", type=int, help="dlio: checkpoints read (default 3)")
    parser.add_argument("--latency-ms", type=float, help="S3 latency per request (default 35)")
    parser.add_argument("--error-rate", type=float, help="S3 503 SlowDown rate (default 0)")
    parser.add_argument("--upload-delay", type=float, help="Cistern --upload-delay (default 1)")
    parser.add_argument("--cistern-config", help="YAML node config for the Cistern targets "
                        "(cistern-node --config), e.g. for an A/B of one setting")
    parser.add_argument("--workdir", help="directory for mounts and caches (default /tmp)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    setup_logging("debug" if args.verbose else "info")
    cfg = build_config(args)
    unknown = set(cfg.workloads) - set(WORKLOADS)
    if unknown or not cfg.workloads:
        parser.error(f"--workloads: choose from {','.join(WORKLOADS)} "
                     f"(unknown: {','.join(sorted(unknown)) or 'none given'})")
    command = "python -m bench " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    machine = machine_info(cfg.workdir)
    run = run_bench(cfg)
    data = to_json(run, command.strip(), machine)
    for path in write_outputs(data, Path(args.out)):
        print(f"wrote {path}")
    print((Path(args.out) / "results.md").read_text())
    failed = [n for n, errs in data["errors"].items() if errs]
    if failed:
        print(f"failed repetitions: {', '.join(failed)}", file=sys.stderr)


if __name__ == "__main__":
    main()

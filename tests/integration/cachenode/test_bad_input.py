"""Bad input gives one clear error line and a non-zero exit; S3 trouble never loses data."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from support.s3server import TEST_CREDENTIALS, free_port, list_keys, read_object
from support.wait import wait_until


def _run_node(tmp_path: Path, *args: str, env: dict[str, str] | None = None,
              mount: Path | None = None) -> subprocess.CompletedProcess[str]:
    if mount is None:
        mount = tmp_path / "mnt"
        mount.mkdir(exist_ok=True)
    command = [sys.executable, "-m", "cistern.cachenode.cli", "run", "--mount", str(mount),
               "--cache-dir", str(tmp_path / "cache"), "--control",
               f"127.0.0.1:{free_port()}", "--fuse-frontend", "pyfuse3", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60,
                          env=dict(os.environ) | TEST_CREDENTIALS | (env or {}))


def _one_clear_line(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, result.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


def test_missing_bucket(tmp_path: Path, moto: Any) -> None:
    result = _run_node(tmp_path, "--store", "s3://no-such-bucket-here",
                       "--endpoint-url", moto.endpoint)
    _one_clear_line(result, "no-such-bucket-here", "does not exist")


def test_missing_credentials(tmp_path: Path, moto: Any, bucket: str) -> None:
    # moto accepts any key pair, so "wrong" keys cannot be shown against it; no keys at all
    # is the credential mistake we can reproduce for real.
    result = _run_node(tmp_path, "--store", f"s3://{bucket}", "--endpoint-url", moto.endpoint,
                       env={"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "",
                            "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
                            "AWS_CONFIG_FILE": str(tmp_path / "none")})
    _one_clear_line(result, "credentials")


def test_unreachable_endpoint(tmp_path: Path) -> None:
    port = free_port()
    result = _run_node(tmp_path, "--store", "s3://some-bucket",
                       "--endpoint-url", f"http://127.0.0.1:{port}")
    _one_clear_line(result, "reach")


def test_mount_point_missing(tmp_path: Path) -> None:
    result = _run_node(tmp_path, "--store", f"file://{tmp_path}/objects",
                       mount=tmp_path / "nope")
    _one_clear_line(result, "does not exist")


def test_mount_point_not_empty(tmp_path: Path) -> None:
    mount = tmp_path / "busy"
    mount.mkdir()
    (mount / "file").write_text("x")
    result = _run_node(tmp_path, "--store", f"file://{tmp_path}/objects", mount=mount)
    _one_clear_line(result, "not empty")


def test_cache_dir_on_read_only_path(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], check=True)
    try:
        mount = tmp_path / "mnt"
        mount.mkdir()
        command = [sys.executable, "-m", "cistern.cachenode.cli", "run", "--mount", str(mount),
                   "--cache-dir", str(ro / "cache"), "--store", f"file://{tmp_path}/objects",
                   "--control", f"127.0.0.1:{free_port()}"]
        result = subprocess.run(command, capture_output=True, text=True, timeout=60)
        _one_clear_line(result, "not writable", "Read-only")
    finally:
        subprocess.run(["umount", str(ro)], check=False)


def test_invalid_config_value(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("store: {url: 's3://ok-bucket'}\nflush: {mode: sometimes}\n")
    result = _run_node(tmp_path, "--config", str(config))
    _one_clear_line(result, "flush.mode", "writeBack")


def test_help_on_every_command() -> None:
    for args in (["--help"], ["run", "--help"], ["status", "--help"], ["flush", "--help"],
                 ["drain", "--help"]):
        result = subprocess.run([sys.executable, "-m", "cistern.cachenode.cli", *args],
                                capture_output=True, text=True, timeout=30)
        assert result.returncode == 0 and "usage: cistern-node" in result.stdout


def test_client_commands_report_unreachable_node() -> None:
    result = subprocess.run([sys.executable, "-m", "cistern.cachenode.cli", "status",
                             "--control", f"127.0.0.1:{free_port()}"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode != 0 and "no cache node answers" in result.stderr
    assert "Traceback" not in result.stderr


# The outage is between the flusher and S3; the front end only writes and reads one file
# (tests/integration/cachenode/test_posix.py covers that on every front end).
@pytest.mark.parametrize("frontend", ["pyfuse3"])
def test_s3_outage_while_running_loses_nothing(make_node: Any, bucket: str, s3: Any,
                                               proxy: Any) -> None:
    node = make_node(bucket, endpoint=proxy.endpoint, upload_delay=0.0)
    proxy.set(outage=True)
    data = os.urandom(64_000)
    (node.mount / "during-outage.bin").write_bytes(data)
    wait_until(lambda: node.status().errors, what="a store error reported in /status")
    status = node.status()
    assert status.dirty_files == 1
    assert status.recent_errors, status
    assert node.metric("cistern_s3_errors_total") > 0
    assert (node.mount / "during-outage.bin").read_bytes() == data
    proxy.set(outage=False)
    node.flush(timeout=120)
    assert read_object(s3, bucket, "during-outage.bin") == data
    assert list_keys(s3, bucket) == {"during-outage.bin": 64_000}


# The CLI talks to the control API; the front end the files came through plays no part.
@pytest.mark.parametrize("frontend", ["pyfuse3"])
@pytest.mark.parametrize("command", ["status", "flush", "drain"])
def test_cli_against_running_node(make_node: Any, bucket: str, command: str) -> None:
    node = make_node(bucket)
    (node.mount / "x").write_text("x")
    result = subprocess.run([sys.executable, "-m", "cistern.cachenode.cli", command,
                             "--control", node.control], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "state:" in result.stdout
    if command == "drain":
        assert "drained" in result.stdout

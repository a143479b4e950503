"""rclone as an S3 client of the node's endpoint (copy up, list, copy down, delete)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from support.s3server import read_object

pytestmark = pytest.mark.skipif(shutil.which("rclone") is None,
                                reason="rclone is not installed (scripts/install.sh adds it)")


def _rclone(s3node: Any, *args: str) -> str:
    # Other AWS_* settings of this environment (a CA bundle for HTTPS) are not rclone's business.
    base = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env = dict(base, RCLONE_CONFIG_NODE_TYPE="s3", RCLONE_CONFIG_NODE_PROVIDER="Other",
               RCLONE_CONFIG_NODE_ACCESS_KEY_ID=s3node.access_key,
               RCLONE_CONFIG_NODE_SECRET_ACCESS_KEY=s3node.secret_key,
               RCLONE_CONFIG_NODE_ENDPOINT=s3node.endpoint,
               RCLONE_CONFIG_NODE_REGION="us-east-1",
               RCLONE_CONFIG_NODE_FORCE_PATH_STYLE="true",
               RCLONE_CONFIG="/dev/null")
    result = subprocess.run(["rclone", "--retries", "1", "--low-level-retries", "1",
                             "--s3-chunk-size", "5M", "--s3-upload-cutoff", "6M",
                             *args], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_rclone_copy_up_list_and_down(s3node: Any, s3: Any, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub" / "deeper").mkdir(parents=True)
    files = {"a.txt": b"alpha", "sub/b.bin": os.urandom(1 << 20),
             "sub/deeper/c.bin": os.urandom(13 << 20)}  # the last one is a multipart upload
    for name, data in files.items():
        (src / name).write_bytes(data)
    _rclone(s3node, "copy", str(src), f"node:{s3node.bucket}/rc")
    listed = _rclone(s3node, "lsf", "-R", "--files-only", f"node:{s3node.bucket}/rc")
    assert sorted(listed.split()) == sorted(files)
    back = tmp_path / "back"
    _rclone(s3node, "copy", f"node:{s3node.bucket}/rc", str(back))
    for name, data in files.items():
        assert (back / name).read_bytes() == data
        assert (s3node.node.mount / "rc" / name).read_bytes() == data
    _rclone(s3node, "check", str(src), f"node:{s3node.bucket}/rc")
    s3node.node.flush()
    for name, data in files.items():
        assert read_object(s3, s3node.bucket, f"rc/{name}") == data
    _rclone(s3node, "delete", f"node:{s3node.bucket}/rc/sub")
    assert _rclone(s3node, "lsf", "-R", "--files-only", f"node:{s3node.bucket}/rc").split() \
        == ["a.txt"]

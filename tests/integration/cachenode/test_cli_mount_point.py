"""The mount point the operator's config names is created by the daemon (issue 12).

The operator's DaemonSet mounts the host's mount *root* and starts ``cistern-node run
--config FILE`` whose ``mount`` is ``<root>/<writecache>``; on a fresh node that leaf does not
exist. Needs root and /dev/fuse."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from support.node import is_mounted, unmount
from support.s3server import free_port
from support.wait import wait_until

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/fuse"),
    reason="a real cistern-node needs root and /dev/fuse to mount")


def _config(tmp_path: Path, mount: Path) -> Path:
    config = tmp_path / "node.yaml"
    config.write_text(yaml.safe_dump({
        "mount": str(mount), "store": {"url": f"file://{tmp_path}/objects"},
        "cache": {"dir": str(tmp_path / "cache")}, "control": f"127.0.0.1:{free_port()}",
        "fuseFrontend": "pyfuse3"}))
    return config


def test_config_mount_point_under_an_existing_root_is_created(tmp_path: Path) -> None:
    root = tmp_path / "mounts"
    root.mkdir()
    mount = root / "ckpt"
    node = subprocess.Popen([sys.executable, "-m", "cistern.cachenode.cli", "run", "--config",
                             str(_config(tmp_path, mount))],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: is_mounted(mount) or node.poll() is not None, 30, "the mount")
        assert is_mounted(mount), node.stderr.read() if node.poll() is not None else ""
        (mount / "probe").write_bytes(b"x")
        assert (mount / "probe").read_bytes() == b"x"
    finally:
        node.send_signal(signal.SIGINT)
        try:
            node.wait(30)
        except subprocess.TimeoutExpired:
            node.kill()
            node.wait()
        unmount(mount)
    assert node.returncode == 0


def test_config_mount_point_under_a_missing_root_is_an_error(tmp_path: Path) -> None:
    mount = tmp_path / "no-such-root" / "ckpt"
    result = subprocess.run([sys.executable, "-m", "cistern.cachenode.cli", "run", "--config",
                             str(_config(tmp_path, mount))],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and f"{mount} does not exist" in errors[0], result.stderr
    assert not (tmp_path / "no-such-root").exists()

"""A node told to serve S3 refuses to start without usable credentials or address."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest


def test_missing_credentials_stop_the_start(make_node: Any, bucket: str, tmp_path: Path
                                            ) -> None:
    with pytest.raises(RuntimeError, match="s3Endpoint credentials"):
        make_node(bucket, config={"s3Endpoint": {"listen": "127.0.0.1:0",
                                                 "credentialsDir": str(tmp_path / "none")}})


def test_a_busy_port_stops_the_start(make_node: Any, bucket: str, tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "accessKeyId").write_text("k")
    (creds / "secretAccessKey").write_text("s")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(RuntimeError, match="cannot start the S3 endpoint"):
            make_node(bucket, config={"s3Endpoint": {"listen": f"127.0.0.1:{port}",
                                                     "credentialsDir": str(creds)}})


"""A cache node serving its S3 endpoint, in front of moto behind the fault proxy."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from support.node import NodeProcess
from support.s3server import free_port

ACCESS_KEY = "cistern-test-key"
SECRET_KEY = "cistern-test-secret/with+odd=chars"


@dataclass
class S3Node:
    node: NodeProcess
    endpoint: str
    bucket: str
    socket: Path
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY

    def env(self) -> dict[str, str]:
        """What a pod's environment would say: credentials and AWS_ENDPOINT_URL."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_ENDPOINT_URL": self.endpoint, "AWS_REGION": "us-east-1",
                "AWS_DEFAULT_REGION": "us-east-1"}

    def client(self, *, secret: str = SECRET_KEY, **config: Any) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3", endpoint_url=self.endpoint, region_name="us-east-1",
            aws_access_key_id=ACCESS_KEY, aws_secret_access_key=secret,
            config=Config(s3={"addressing_style": "path"},
                          retries={"max_attempts": 2, "mode": "standard"}, **config))


@pytest.fixture
def frontend() -> str:
    """The S3 endpoint does not depend on the FUSE front end: one is enough here."""
    return "pyfuse3"


@pytest.fixture
def make_s3node(make_node: Callable[..., NodeProcess], bucket: str, proxy: Any,
                tmp_path: Path) -> Callable[..., S3Node]:
    """A node with its S3 endpoint on; pass ``again=<S3Node>`` to restart one on the same
    cache dir, mount and endpoint address."""
    creds = tmp_path / "s3-credentials"
    creds.mkdir()
    (creds / "accessKeyId").write_text(ACCESS_KEY + "\n")
    (creds / "secretAccessKey").write_text(SECRET_KEY + "\n")

    def make(again: S3Node | None = None, **kwargs: Any) -> S3Node:
        port = int(again.endpoint.rsplit(":", 1)[1]) if again else free_port()
        sock = tmp_path / "s3.sock"
        if again is not None:
            kwargs.update(cache_dir=again.node.cache_dir, mount=again.node.mount)
        node = make_node(bucket, endpoint=proxy.endpoint, config={"s3Endpoint": {
            "listen": f"127.0.0.1:{port}", "socket": str(sock),
            "credentialsDir": str(creds)}}, **kwargs)
        status = node.status()
        assert status.s3_endpoint is not None, status
        assert status.s3_endpoint.url == f"http://127.0.0.1:{port}", status
        return S3Node(node, f"http://127.0.0.1:{port}", bucket, sock)

    return make


@pytest.fixture
def s3node(make_s3node: Callable[..., S3Node]) -> S3Node:
    return make_s3node()

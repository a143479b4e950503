"""The endpoint's unix socket (for pods that mount it): same requests, same signatures."""

from __future__ import annotations

import http.client
import socket
from typing import Any

from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=30)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self._path)


def test_the_unix_socket_serves_the_same_endpoint(make_s3node: Any) -> None:
    s3node = make_s3node()
    s3node.client().put_object(Bucket=s3node.bucket, Key="via-tcp", Body=b"hello")
    request = AWSRequest(method="GET", url=f"http://localhost/{s3node.bucket}/via-tcp",
                         headers={"X-Amz-Content-SHA256": "UNSIGNED-PAYLOAD"})
    S3SigV4Auth(Credentials(s3node.access_key, s3node.secret_key), "s3",
                "us-east-1").add_auth(request)
    conn = _UnixHTTPConnection(str(s3node.socket))
    conn.request("GET", f"/{s3node.bucket}/via-tcp", headers=dict(request.headers.items()))
    response = conn.getresponse()
    assert (response.status, response.read()) == (200, b"hello")
    conn.request("GET", f"/{s3node.bucket}/via-tcp")  # unsigned
    denied = conn.getresponse()
    assert denied.status == 403 and b"AccessDenied" in denied.read()
    conn.close()

"""The S3 fault/latency proxy against a real moto server, driven by boto3 and raw HTTP."""

from __future__ import annotations

import http.client
import io
import os
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import ClientError, ConnectionClosedError

from support.faultproxy import FaultProxy, FaultProxyProcess, ProxyControl, classify
from support.s3server import MotoServer
from support.wait import wait_until

BUCKET = "proxy-tests"


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    with MotoServer() as server:
        server.client().create_bucket(Bucket=BUCKET)
        yield server


@pytest.fixture
def proxy(moto: MotoServer) -> Iterator[FaultProxy]:
    with FaultProxy(moto.endpoint) as running:
        yield running


def client(endpoint: str, attempts: int = 1) -> Any:
    return boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id="testing",
        aws_secret_access_key="testing", region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"},
                      retries={"total_max_attempts": attempts, "mode": "standard"}),
    )


def test_counts_every_request_kind_and_logs_puts_in_completion_order(
        proxy: FaultProxy) -> None:
    s3 = client(proxy.endpoint)
    s3.put_object(Bucket=BUCKET, Key="a/one", Body=b"1")
    s3.put_object(Bucket=BUCKET, Key="a/two", Body=b"22")
    mpu = s3.create_multipart_upload(Bucket=BUCKET, Key="a/big")
    part = s3.upload_part(Bucket=BUCKET, Key="a/big", UploadId=mpu["UploadId"], PartNumber=1,
                          Body=b"p" * 1024)
    s3.complete_multipart_upload(
        Bucket=BUCKET, Key="a/big", UploadId=mpu["UploadId"],
        MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": part["ETag"]}]})
    aborted = s3.create_multipart_upload(Bucket=BUCKET, Key="a/aborted")
    s3.abort_multipart_upload(Bucket=BUCKET, Key="a/aborted", UploadId=aborted["UploadId"])
    s3.copy_object(Bucket=BUCKET, Key="a/copy", CopySource={"Bucket": BUCKET, "Key": "a/one"})
    assert s3.get_object(Bucket=BUCKET, Key="a/two")["Body"].read() == b"22"
    assert s3.head_object(Bucket=BUCKET, Key="a/big")["ContentLength"] == 1024
    listed = s3.list_objects_v2(Bucket=BUCKET, Prefix="a/")
    assert {o["Key"] for o in listed["Contents"]} == {"a/one", "a/two", "a/big", "a/copy"}
    s3.delete_object(Bucket=BUCKET, Key="a/copy")
    s3.delete_objects(Bucket=BUCKET, Delete={"Objects": [{"Key": "a/one"}]})

    counts = proxy.counts()
    assert counts == {
        "PUT": 2, "PART": 1, "CREATE_MPU": 2, "COMPLETE_MPU": 1, "ABORT_MPU": 1, "COPY": 1,
        "DELETE": 2, "GET": 1, "HEAD": 1, "LIST": 1, "OTHER": 0, "THROTTLED": 0,
    }
    puts = [(e.kind, e.key, e.status) for e in proxy.log() if e.kind == "PUT"]
    assert puts == [("PUT", "a/one", 200), ("PUT", "a/two", 200)]
    times = [e.time for e in proxy.log()]
    assert times == sorted(times)

    proxy.reset()
    assert proxy.counts()["PUT"] == 0
    assert proxy.log() == []


def test_injected_slowdown_rate_and_error_document(proxy: FaultProxy) -> None:
    client(proxy.endpoint).put_object(Bucket=BUCKET, Key="rate", Body=b"r", ACL="public-read")
    proxy.set(error_rate=0.3, seed=7)
    statuses = []
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    for _ in range(300):
        conn.request("HEAD", f"/{BUCKET}/rate")
        response = conn.getresponse()
        response.read()
        statuses.append(response.status)
    failed = statuses.count(503)
    assert set(statuses) == {200, 503}
    assert 60 <= failed <= 120, failed  # 30 % of 300, far outside any plausible noise
    assert proxy.counts()["THROTTLED"] == failed
    assert proxy.throttled() == {"HEAD": failed}

    conn.request("GET", f"/{BUCKET}/rate")
    while True:  # next failing GET: the body is S3's error document
        response = conn.getresponse()
        body = response.read()
        if response.status == 503:
            break
        conn.request("GET", f"/{BUCKET}/rate")
    error = ET.fromstring(body)
    assert error.findtext("Code") == "SlowDown"
    assert error.findtext("Resource") == f"/{BUCKET}/rate"
    assert response.getheader("Content-Type") == "application/xml"


def test_errors_limited_to_some_kinds_and_internal_errors(proxy: FaultProxy) -> None:
    proxy.set(internal_error_rate=1.0, error_kinds={"PUT"})
    s3 = client(proxy.endpoint)
    with pytest.raises(ClientError) as failure:
        s3.put_object(Bucket=BUCKET, Key="never", Body=b"n")
    assert failure.value.response["Error"]["Code"] == "InternalError"
    assert failure.value.response["ResponseMetadata"]["HTTPStatusCode"] == 500
    s3.list_objects_v2(Bucket=BUCKET)  # LIST is not eligible
    assert proxy.throttled() == {"PUT": 1}
    assert "never" not in {o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET)["Contents"]}


def test_boto3_retries_through_slowdowns_with_large_bodies(proxy: FaultProxy) -> None:
    proxy.set(error_rate=0.3, internal_error_rate=0.1, seed=11)
    s3 = client(proxy.endpoint, attempts=20)
    bodies = {f"retry/{i}": os.urandom(2 << 20) for i in range(8)}  # Expect: 100-continue
    for key, body in bodies.items():
        s3.put_object(Bucket=BUCKET, Key=key, Body=body)
    proxy.set(error_rate=0.0, internal_error_rate=0.0)
    for key, body in bodies.items():
        assert s3.get_object(Bucket=BUCKET, Key=key)["Body"].read() == body
    counts = proxy.counts()
    assert counts["THROTTLED"] > 0
    assert counts["PUT"] == len(bodies) + counts["THROTTLED"]
    ok_puts = [e.key for e in proxy.log() if e.kind == "PUT" and e.status == 200]
    assert ok_puts == list(bodies)


def test_latency_is_added_to_each_request(proxy: FaultProxy) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)

    def head_seconds() -> list[float]:
        samples = []
        for _ in range(5):
            start = time.perf_counter()
            conn.request("HEAD", f"/{BUCKET}")
            conn.getresponse().read()
            samples.append(time.perf_counter() - start)
        return samples

    head_seconds()  # the connection is open and the bucket exists
    proxy.set(latency=0.1)
    # A lower bound only: the proxy holds every request at least `latency` before forwarding
    # it, however busy the machine; an upper bound would measure the machine, not the proxy.
    assert min(head_seconds()) >= 0.1


def test_concurrent_requests_are_delayed_in_parallel(proxy: FaultProxy) -> None:
    proxy.set(latency=2.0)
    errors: list[BaseException] = []

    def put(i: int) -> None:
        try:
            client(proxy.endpoint).put_object(Bucket=BUCKET, Key=f"par/{i}", Body=b"x" * 1000)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=put, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    # The proxy counts a request when it arrives, before its delay. Serialised, a request
    # would arrive only once the one before had been answered: 7 answers by the 8th arrival.
    wait_until(lambda: proxy.counts()["PUT"] == 8, timeout=30, interval=0.01,
               what="8 PUTs at the proxy")
    answered_by_then = [e for e in proxy.log() if e.kind == "PUT"]
    for t in threads:
        t.join()
    assert not errors
    assert answered_by_then == []
    assert proxy.counts()["PUT"] == 8


def test_multipart_upload_with_large_parts_streams_intact(proxy: FaultProxy) -> None:
    proxy.set(latency=0.035)
    s3 = client(proxy.endpoint)
    data = os.urandom(40 << 20)
    config = TransferConfig(multipart_threshold=8 << 20, multipart_chunksize=16 << 20,
                            max_concurrency=3)
    s3.upload_fileobj(io.BytesIO(data), BUCKET, "mpu/big", Config=config)
    counts = proxy.counts()
    assert (counts["CREATE_MPU"], counts["PART"], counts["COMPLETE_MPU"]) == (1, 3, 1)
    assert proxy.stats()["bytes_in"] >= len(data)
    downloaded = io.BytesIO()
    s3.download_fileobj(BUCKET, "mpu/big", downloaded)
    assert downloaded.getvalue() == data


def test_chunked_request_body_is_forwarded(proxy: FaultProxy) -> None:
    pieces = [os.urandom(70_000) for _ in range(6)]
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    conn.request("PUT", f"/{BUCKET}/chunked", body=iter(pieces), encode_chunked=True)
    response = conn.getresponse()
    response.read()
    assert response.status == 200
    # keep-alive: the same connection serves the next request
    conn.request("HEAD", f"/{BUCKET}/chunked")
    conn.getresponse().read()
    body = client(proxy.endpoint).get_object(Bucket=BUCKET, Key="chunked")["Body"].read()
    assert body == b"".join(pieces)
    assert proxy.counts()["PUT"] == 1
    assert proxy.counts()["HEAD"] == 1


def test_outage_modes_and_recovery(proxy: FaultProxy) -> None:
    s3 = client(proxy.endpoint)
    s3.put_object(Bucket=BUCKET, Key="outage", Body=b"o")
    proxy.set(outage=True)
    with pytest.raises(ClientError) as failure:
        s3.head_object(Bucket=BUCKET, Key="outage")
    assert failure.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503
    proxy.set(outage_mode="refuse")
    with pytest.raises(ConnectionClosedError):
        s3.get_object(Bucket=BUCKET, Key="outage")
    proxy.set(outage=False)
    assert s3.get_object(Bucket=BUCKET, Key="outage")["Body"].read() == b"o"
    assert proxy.throttled() == {"HEAD": 1, "GET": 1}


def test_invalid_settings_are_rejected(proxy: FaultProxy) -> None:
    with pytest.raises(ValueError):
        proxy.set(error_rate=1.5)
    with pytest.raises(ValueError):
        proxy.set(error_kinds={"PUTS"})
    with pytest.raises(ValueError):
        proxy.set(latencyy=1)
    assert proxy.config.error_rate == 0.0


def test_process_mode_with_control_endpoints(moto: MotoServer) -> None:
    with FaultProxyProcess(moto.endpoint, latency=0.02, error_rate=0.0) as process:
        s3 = client(process.endpoint)
        s3.put_object(Bucket=BUCKET, Key="proc/a", Body=b"a")
        s3.list_objects_v2(Bucket=BUCKET, Prefix="proc/")
        control = ProxyControl(process.endpoint)
        stats = control.stats()
        assert stats["config"]["latency"] == pytest.approx(0.02)
        assert stats["counts"]["PUT"] == 1
        assert stats["counts"]["LIST"] == 1
        assert [(e.kind, e.key, e.status) for e in control.log()] == [
            ("PUT", "proc/a", 200), ("LIST", "", 200)]
        config = control.set(error_rate=1.0, error_kinds=["GET"])
        assert config["error_rate"] == 1.0
        assert config["error_kinds"] == ["GET"]
        with pytest.raises(ClientError):
            s3.get_object(Bucket=BUCKET, Key="proc/a")
        assert control.counts()["THROTTLED"] == 1
        control.reset()
        assert control.counts()["PUT"] == 0


@pytest.mark.parametrize(("method", "path", "query", "headers", "kind"), [
    ("PUT", "/b/k", "", {}, "PUT"),
    ("PUT", "/b/k", "partNumber=1&uploadId=u", {}, "PART"),
    ("PUT", "/b/k", "", {"x-amz-copy-source": "/b/o"}, "COPY"),
    ("PUT", "/b", "", {}, "OTHER"),
    ("POST", "/b/k", "uploads", {}, "CREATE_MPU"),
    ("POST", "/b/k", "uploadId=u", {}, "COMPLETE_MPU"),
    ("POST", "/b", "delete", {}, "DELETE"),
    ("DELETE", "/b/k", "uploadId=u", {}, "ABORT_MPU"),
    ("DELETE", "/b/k", "", {}, "DELETE"),
    ("GET", "/b", "list-type=2&prefix=x", {}, "LIST"),
    ("GET", "/b", "location", {}, "OTHER"),
    ("GET", "/b/k%20space", "", {}, "GET"),
    ("HEAD", "/b/k", "", {}, "HEAD"),
])
def test_classify(method: str, path: str, query: str, headers: dict[str, str],
                  kind: str) -> None:
    assert classify(method, path, query, headers)[0] == kind

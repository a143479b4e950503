"""An S3 latency/fault-injecting reverse proxy for tests and benchmarks.

The proxy listens on 127.0.0.1 in front of an S3 endpoint (normally ``MotoServer``) and

* delays every S3 request by a fixed latency before forwarding it, and can hold the answer
  of a forwarded request (``response_delay``: the request took effect, its client has not
  heard yet),
* answers a configurable fraction of requests (optionally only some kinds) with a real
  S3 error document (``503 SlowDown`` or ``500 InternalError``) without forwarding them,
* can flip a byte of the next GET answers (``corrupt_gets``),
* can simulate an outage: every request fails with ``503 ServiceUnavailable`` or the
  connection is reset,
* counts requests by kind (``PUT``, ``PART``, ``CREATE_MPU``, ``COMPLETE_MPU``,
  ``ABORT_MPU``, ``COPY``, ``DELETE``, ``GET``, ``HEAD``, ``LIST``, ``OTHER``) and keeps
  an ordered log of completed requests.

Use it in-process::

    with FaultProxy(moto.endpoint, latency=0.035, error_rate=0.3) as proxy:
        client = s3_client(proxy.endpoint)
        ...
        proxy.counts()["PUT"]

or as a process (``python -m support.faultproxy --upstream URL --port N``), whose
control endpoints ``GET /__proxy/stats``, ``GET /__proxy/log``, ``POST /__proxy/config``
and ``POST /__proxy/reset`` are wrapped by ``ProxyControl``; ``FaultProxyProcess`` starts
such a process. Control endpoints are never delayed, failed or counted (``__proxy`` is not
a valid bucket name, so they cannot shadow S3 requests).

Log entries are appended when the response to the client is complete, so the order of
``PUT`` entries with status 200 is the order in which objects became durable upstream.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import hashlib
import http.client
import json
import logging
import random
import socket
import struct
import threading
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, NamedTuple

from .s3server import ChildServer, free_port

__all__ = [
    "KINDS",
    "FaultProxy",
    "FaultProxyProcess",
    "LogEntry",
    "ProxyConfig",
    "ProxyControl",
    "classify",
]

logger = logging.getLogger(__name__)

KINDS = (
    "PUT", "PART", "CREATE_MPU", "COMPLETE_MPU", "ABORT_MPU", "COPY",
    "DELETE", "GET", "HEAD", "LIST", "OTHER",
)
OUTAGE_MODES = ("error", "refuse")
CONTROL_PREFIX = "/__proxy/"
_CHUNK = 1 << 20
_HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
    "trailer", "trailers", "transfer-encoding", "upgrade", "expect", "proxy-connection",
})


@dataclass(frozen=True)
class ProxyConfig:
    """What the proxy does to requests; replaced atomically by ``FaultProxy.set``."""

    latency: float = 0.0
    """Seconds added to every S3 request before it is forwarded or failed."""
    error_rate: float = 0.0
    """Fraction of (eligible) requests answered ``503 SlowDown`` without forwarding."""
    internal_error_rate: float = 0.0
    """Fraction of (eligible) requests answered ``500 InternalError`` without forwarding."""
    error_kinds: frozenset[str] | None = None
    """Kinds eligible for injected errors; ``None`` means every kind."""
    outage: bool = False
    """When true every S3 request fails (see ``outage_mode``)."""
    outage_mode: str = "error"
    """``error``: answer ``503 ServiceUnavailable``; ``refuse``: reset the connection."""
    seed: int | None = None
    """Seed of the random choice of failed requests (``None``: unpredictable)."""
    response_delay: float = 0.0
    """Seconds the answer of a forwarded request is held after the upstream gave it: the
    request has taken effect (an object landed) while its client has not heard yet."""
    corrupt_gets: int = 0
    """The next this many GET answers (status 200) have one byte of their body flipped: a
    download corrupted on the way, which only a checksum can catch."""
    opaque_etags: bool = False
    """When true every ``ETag`` response header is replaced by one that is not the MD5 of
    the body, as SSE-KMS, SSE-C and many S3-compatible stores answer."""

    def validate(self) -> ProxyConfig:
        for name in ("latency", "response_delay", "corrupt_gets"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("error_rate", "internal_error_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be within [0, 1], got {value}")
        if self.error_rate + self.internal_error_rate > 1.0:
            raise ValueError("error_rate + internal_error_rate must not exceed 1")
        if self.outage_mode not in OUTAGE_MODES:
            raise ValueError(f"outage_mode must be one of {OUTAGE_MODES}")
        if self.error_kinds is not None:
            unknown = set(self.error_kinds) - set(KINDS)
            if unknown:
                raise ValueError(f"unknown request kinds {sorted(unknown)}; known: {KINDS}")
        return self

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["error_kinds"] = sorted(self.error_kinds) if self.error_kinds is not None else None
        return data


def _config_changes(changes: dict[str, Any]) -> dict[str, Any]:
    known = {f for f in ProxyConfig.__dataclass_fields__}
    unknown = set(changes) - known
    if unknown:
        raise ValueError(f"unknown proxy settings {sorted(unknown)}; known: {sorted(known)}")
    out = dict(changes)
    if "error_kinds" in out and out["error_kinds"] is not None:
        kinds = out["error_kinds"]
        out["error_kinds"] = frozenset([kinds] if isinstance(kinds, str) else kinds)
    for name in ("latency", "response_delay", "error_rate", "internal_error_rate"):
        if name in out:
            out[name] = float(out[name])
    return out


class LogEntry(NamedTuple):
    """One completed S3 request: wall-clock completion time, kind, object key, status."""

    time: float
    kind: str
    key: str
    status: int


def classify(method: str, path: str, query: str, headers: Any) -> tuple[str, str, str]:
    """Return ``(kind, bucket, key)`` of a path-style S3 request."""
    parts = urllib.parse.unquote(path.lstrip("/")).split("/", 1)
    bucket = parts[0]
    key = parts[1] if len(parts) > 1 else ""
    params = urllib.parse.parse_qs(query, keep_blank_values=True)
    method = method.upper()
    if method == "PUT":
        if not key:
            return "OTHER", bucket, key
        if headers.get("x-amz-copy-source"):
            return "COPY", bucket, key
        if "partNumber" in params and "uploadId" in params:
            return "PART", bucket, key
        if params.keys() & {"tagging", "acl", "retention", "legal-hold"}:
            return "OTHER", bucket, key
        return "PUT", bucket, key
    if method == "POST":
        if "uploads" in params:
            return "CREATE_MPU", bucket, key
        if "uploadId" in params:
            return "COMPLETE_MPU", bucket, key
        if "delete" in params:
            return "DELETE", bucket, key
        return "OTHER", bucket, key
    if method == "DELETE":
        if "uploadId" in params:
            return "ABORT_MPU", bucket, key
        return ("DELETE" if key else "OTHER"), bucket, key
    if method == "GET":
        if not key:
            if not bucket or "list-type" in params or "uploads" in params or "versions" in params:
                return "LIST", bucket, key
            if params.keys() - {"prefix", "delimiter", "marker", "max-keys", "encoding-type"}:
                return "OTHER", bucket, key
            return "LIST", bucket, key
        if "uploadId" in params:
            return "LIST", bucket, key
        return "GET", bucket, key
    if method == "HEAD":
        return "HEAD", bucket, key
    return "OTHER", bucket, key


def _error_document(code: str, message: str, resource: str) -> bytes:
    request_id = uuid.uuid4().hex[:16].upper()
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message>"
        f"<Resource>{resource}</Resource><RequestId>{request_id}</RequestId></Error>"
    ).encode()


_ERRORS = {
    "SlowDown": (503, "Please reduce your request rate."),
    "InternalError": (500, "We encountered an internal error. Please try again."),
    "ServiceUnavailable": (503, "Service is unable to handle request."),
}


class _State:
    """Configuration, counters and log shared by the handler threads."""

    def __init__(self, upstream: str, config: ProxyConfig, log_size: int) -> None:
        parsed = urllib.parse.urlsplit(upstream)
        if parsed.scheme != "http" or not parsed.hostname:
            raise ValueError(f"upstream must be an http:// URL, got {upstream!r}")
        self.upstream = upstream
        self.upstream_host = parsed.hostname
        self.upstream_port = parsed.port or 80
        self.lock = threading.Lock()
        self.config = config.validate()
        self.random = random.Random(config.seed)
        self.counts: collections.Counter[str] = collections.Counter()
        self.throttled: collections.Counter[str] = collections.Counter()
        self.bytes_in = 0
        self.bytes_out = 0
        self.log: collections.deque[LogEntry] = collections.deque(maxlen=log_size)
        self.corrupt_left = self.config.corrupt_gets

    def set(self, **changes: Any) -> ProxyConfig:
        changes = _config_changes(changes)
        with self.lock:
            new = replace(self.config, **changes).validate()
            if "seed" in changes:
                self.random = random.Random(new.seed)
            if "corrupt_gets" in changes:
                self.corrupt_left = new.corrupt_gets
            self.config = new
            return new

    def reset(self) -> None:
        with self.lock:
            self.counts.clear()
            self.throttled.clear()
            self.bytes_in = 0
            self.bytes_out = 0
            self.log.clear()

    def decide(self, kind: str) -> tuple[ProxyConfig, str | None]:
        """Count the request and return the config in force and an injected error code."""
        with self.lock:
            config = self.config
            self.counts[kind] += 1
            error: str | None = None
            if config.outage:
                error = "ServiceUnavailable" if config.outage_mode == "error" else "refuse"
            elif config.error_kinds is None or kind in config.error_kinds:
                draw = self.random.random()
                if draw < config.error_rate:
                    error = "SlowDown"
                elif draw < config.error_rate + config.internal_error_rate:
                    error = "InternalError"
            if error is not None:
                self.throttled[kind] += 1
            return config, error

    def record(self, kind: str, key: str, status: int, sent: int, received: int) -> None:
        with self.lock:
            self.bytes_in += sent
            self.bytes_out += received
            self.log.append(LogEntry(time.time(), kind, key, status))

    def stats(self) -> dict[str, Any]:
        with self.lock:
            counts = {kind: self.counts.get(kind, 0) for kind in KINDS}
            counts["THROTTLED"] = sum(self.throttled.values())
            return {
                "upstream": self.upstream,
                "counts": counts,
                "throttled": {k: v for k, v in self.throttled.items() if v},
                "bytes_in": self.bytes_in,
                "bytes_out": self.bytes_out,
                "config": self.config.to_json(),
                "log_entries": len(self.log),
            }

    def log_entries(self) -> list[LogEntry]:
        with self.lock:
            return list(self.log)


class _Request(NamedTuple):
    kind: str
    key: str
    resource: str
    error: str | None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - base signature
        logger.debug("%s %s", self.address_string(), format % args)

    # -- request lifecycle -------------------------------------------------------------

    def parse_request(self) -> bool:
        self._pending: _Request | None = None
        return super().parse_request()

    def handle_expect_100(self) -> bool:
        if self.path.startswith(CONTROL_PREFIX):
            return super().handle_expect_100()
        request = self._begin()
        if request.error is None:
            return super().handle_expect_100()
        # Like S3: the body is never sent, the error ends the connection.
        self._fail(request, drain=False)
        return False

    def _begin(self) -> _Request:
        if self._pending is not None:
            return self._pending
        split = urllib.parse.urlsplit(self.path)
        kind, _bucket, key = classify(self.command, split.path, split.query, self.headers)
        config, error = self.server.state.decide(kind)
        if config.latency:
            time.sleep(config.latency)
        self._pending = _Request(kind, key, split.path, error)
        return self._pending

    def _dispatch(self) -> None:
        if self.path.startswith(CONTROL_PREFIX):
            self._control()
            return
        request = self._begin()
        if request.error is not None:
            self._fail(request, drain=True)
            return
        self._forward(request)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _dispatch

    # -- injected failures -------------------------------------------------------------

    def _fail(self, request: _Request, drain: bool) -> None:
        if request.error == "refuse":
            self._reset_connection()
            self.server.state.record(request.kind, request.key, 0, 0, 0)
            return
        assert request.error is not None
        sent = self._drain_body() if drain else 0
        status, message = _ERRORS[request.error]
        body = _error_document(request.error, message, request.resource)
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("x-amz-request-id", uuid.uuid4().hex[:16].upper())
        if not drain:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.server.state.record(request.kind, request.key, status, sent, 0)

    def _reset_connection(self) -> None:
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                       struct.pack("ii", 1, 0))
            self.connection.shutdown(socket.SHUT_RDWR)

    def _drain_body(self) -> int:
        return sum(len(chunk) for chunk in self._request_body())

    # -- body streaming ----------------------------------------------------------------

    def _is_chunked(self) -> bool:
        return "chunked" in self.headers.get("Transfer-Encoding", "").lower()

    def _request_body(self) -> Iterable[bytes]:
        """Yield the request body as it arrives; chunked bodies are yielded raw (framed)."""
        if self._is_chunked():
            yield from self._raw_chunks()
            return
        remaining = int(self.headers.get("Content-Length") or 0)
        while remaining > 0:
            chunk = self.rfile.read(min(_CHUNK, remaining))
            if not chunk:
                raise ConnectionError("client closed the connection mid-body")
            remaining -= len(chunk)
            yield chunk

    def _raw_chunks(self) -> Iterable[bytes]:
        while True:
            line = self.rfile.readline(65537)
            if not line:
                raise ConnectionError("client closed the connection mid-chunk")
            yield line
            size = int(line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                while True:  # trailer section up to the empty line
                    trailer = self.rfile.readline(65537)
                    if not trailer:
                        raise ConnectionError("client closed the connection in trailers")
                    yield trailer
                    if trailer in (b"\r\n", b"\n"):
                        return
            remaining = size + 2  # data and its CRLF
            while remaining > 0:
                data = self.rfile.read(min(_CHUNK, remaining))
                if not data:
                    raise ConnectionError("client closed the connection mid-chunk")
                remaining -= len(data)
                yield data

    def _forward(self, request: _Request) -> None:
        state = self.server.state
        upstream = http.client.HTTPConnection(state.upstream_host, state.upstream_port,
                                              timeout=300)
        sent = received = 0
        try:
            upstream.putrequest(self.command, self.path, skip_host=True,
                                skip_accept_encoding=True)
            for name, value in self.headers.items():
                if name.lower() not in _HOP_BY_HOP:
                    upstream.putheader(name, value)
            chunked = self._is_chunked()
            if chunked:
                upstream.putheader("Transfer-Encoding", "chunked")
            elif "Content-Length" not in self.headers and self.command in ("PUT", "POST"):
                upstream.putheader("Content-Length", "0")
            upstream.putheader("Connection", "close")
            upstream.endheaders()
            for chunk in self._request_body():
                upstream.send(chunk)
                sent += len(chunk)
            response = upstream.getresponse()
            with state.lock:
                hold = state.config.response_delay
            if hold:
                time.sleep(hold)
        except (OSError, http.client.HTTPException) as exc:
            upstream.close()
            logger.warning("upstream %s failed for %s %s: %s", state.upstream, self.command,
                           self.path, exc)
            self.close_connection = True
            body = _error_document("ServiceUnavailable", f"proxy upstream error: {exc}",
                                   request.resource)
            with contextlib.suppress(OSError):
                self.send_response(503)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(body)
            state.record(request.kind, request.key, 503, sent, 0)
            return
        corrupt = False
        if request.kind == "GET" and response.status == 200:
            with state.lock:
                corrupt = state.corrupt_left > 0
                state.corrupt_left -= int(corrupt)
        try:
            received = self._relay_response(response, corrupt)
        finally:
            upstream.close()
            state.record(request.kind, request.key, response.status, sent, received)

    def _relay_response(self, response: http.client.HTTPResponse, corrupt: bool = False
                        ) -> int:
        self.send_response_only(response.status, response.reason)
        length = response.getheader("Content-Length")
        no_body = self.command == "HEAD" or response.status in (204, 304) or (
            100 <= response.status < 200)
        with self.server.state.lock:
            opaque = self.server.state.config.opaque_etags
        for name, value in response.getheaders():
            if name.lower() not in _HOP_BY_HOP:
                if opaque and name.lower() == "etag":
                    value = '"' + hashlib.sha256(value.encode()).hexdigest()[:40] + '"'
                self.send_header(name, value)
        rechunk = not no_body and length is None
        if rechunk:
            self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        received = 0
        if no_body:
            response.read()
            self.wfile.flush()
            return 0
        while True:
            data = response.read(_CHUNK)
            if not data:
                break
            if corrupt:
                data, corrupt = bytes([data[0] ^ 0xFF]) + data[1:], False
            received += len(data)
            if rechunk:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            else:
                self.wfile.write(data)
        if rechunk:
            self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()
        return received

    # -- control endpoints -------------------------------------------------------------

    def _control(self) -> None:
        state = self.server.state
        name = urllib.parse.urlsplit(self.path).path[len(CONTROL_PREFIX):]
        body = b"".join(self._request_body())
        try:
            if self.command == "GET" and name == "stats":
                self._reply_json(200, state.stats())
            elif self.command == "GET" and name == "log":
                self._reply_json(200, [list(e) for e in state.log_entries()])
            elif self.command == "POST" and name == "config":
                changes = json.loads(body or b"{}")
                if not isinstance(changes, dict):
                    raise ValueError("config body must be a JSON object")
                self._reply_json(200, state.set(**changes).to_json())
            elif self.command == "POST" and name == "reset":
                state.reset()
                self._reply_json(200, state.stats())
            else:
                self._reply_json(404, {"error": f"no control endpoint {self.command} {name}"})
        except (ValueError, TypeError) as exc:
            self._reply_json(400, {"error": str(exc)})

    def _reply_json(self, status: int, payload: Any) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256

    def __init__(self, address: tuple[str, int], state: _State) -> None:
        self.state = state
        super().__init__(address, _Handler)


class FaultProxy:
    """The proxy in this process, served by a background thread (one thread per connection)."""

    def __init__(self, upstream: str, latency: float = 0.0, error_rate: float = 0.0,
                 *, internal_error_rate: float = 0.0, error_kinds: Iterable[str] | None = None,
                 outage: bool = False, outage_mode: str = "error", seed: int | None = None,
                 port: int = 0, log_size: int = 100_000) -> None:
        config = ProxyConfig(
            latency=latency, error_rate=error_rate, internal_error_rate=internal_error_rate,
            error_kinds=frozenset(error_kinds) if error_kinds is not None else None,
            outage=outage, outage_mode=outage_mode, seed=seed,
        )
        self._state = _State(upstream.rstrip("/"), config, log_size)
        self._port = port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the proxy is not started")
        return int(self._server.server_address[1])

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def upstream(self) -> str:
        return self._state.upstream

    @property
    def config(self) -> ProxyConfig:
        return self._state.config

    def start(self) -> FaultProxy:
        self._server = _Server(("127.0.0.1", self._port), self._state)
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name=f"faultproxy-{self.port}", daemon=True)
        self._thread.start()
        logger.info("fault proxy on %s -> %s", self.endpoint, self.upstream)
        return self

    def serve_forever(self) -> None:
        """Serve in the calling thread (the process entry point)."""
        self._server = _Server(("127.0.0.1", self._port), self._state)
        try:
            self._server.serve_forever()
        finally:
            self._server.server_close()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._server = None
        self._thread = None

    def set(self, **changes: Any) -> ProxyConfig:
        """Change settings of ``ProxyConfig`` at runtime; returns the new config."""
        return self._state.set(**changes)

    def counts(self) -> dict[str, int]:
        """Requests received per kind (injected failures included) and ``THROTTLED``."""
        return dict(self._state.stats()["counts"])

    def throttled(self) -> dict[str, int]:
        """Injected failures per kind."""
        return dict(self._state.stats()["throttled"])

    def stats(self) -> dict[str, Any]:
        return self._state.stats()

    def log(self) -> list[LogEntry]:
        return self._state.log_entries()

    def reset(self) -> None:
        """Clear counters and log (the config is kept)."""
        self._state.reset()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


class ProxyControl:
    """Reads and changes a proxy running in another process through its control endpoints."""

    def __init__(self, endpoint: str, timeout: float = 10.0) -> None:
        self.endpoint = endpoint.rstrip("/")
        self.timeout = timeout

    def _call(self, method: str, name: str, payload: Any = None) -> Any:
        data = json.dumps(payload).encode() if payload is not None else None
        req = urllib.request.Request(f"{self.endpoint}{CONTROL_PREFIX}{name}", data=data,
                                     method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=self.timeout) as resp:
            return json.loads(resp.read())

    def stats(self) -> dict[str, Any]:
        return dict(self._call("GET", "stats"))

    def counts(self) -> dict[str, int]:
        return dict(self.stats()["counts"])

    def log(self) -> list[LogEntry]:
        return [LogEntry(*entry) for entry in self._call("GET", "log")]

    def set(self, **changes: Any) -> dict[str, Any]:
        if "error_kinds" in changes and changes["error_kinds"] is not None:
            changes["error_kinds"] = sorted(changes["error_kinds"])
        return dict(self._call("POST", "config", changes))

    def reset(self) -> None:
        self._call("POST", "reset", {})

    def restore(self) -> None:
        """As freshly started without options: every setting at its default, counters and log
        cleared (one proxy process serves many tests)."""
        self.set(**{f.name: f.default for f in fields(ProxyConfig)})
        self.reset()


class FaultProxyProcess(ChildServer):
    """``python -m support.faultproxy`` as a child process on a free port."""

    module = "faultproxy"

    def __init__(self, upstream: str, latency: float = 0.0, error_rate: float = 0.0,
                 *, port: int | None = None, extra_args: list[str] | None = None) -> None:
        super().__init__(port)
        self.upstream = upstream
        self._args = [
            "--upstream", upstream, "--port", str(self.port),
            "--latency-ms", str(latency * 1000.0), "--error-rate", str(error_rate),
            *(extra_args or []),
        ]
        self.control = ProxyControl(self.endpoint)

    def arguments(self) -> list[str]:
        return self._args


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="S3 latency/fault-injecting proxy on 127.0.0.1 (tests and benchmarks)")
    parser.add_argument("--upstream", required=True, help="S3 endpoint URL (http://...)")
    parser.add_argument("--port", type=int, default=0, help="port (0: pick a free one)")
    parser.add_argument("--latency-ms", type=float, default=0.0,
                        help="milliseconds added to every S3 request")
    parser.add_argument("--error-rate", type=float, default=0.0,
                        help="fraction of requests answered 503 SlowDown")
    parser.add_argument("--internal-error-rate", type=float, default=0.0,
                        help="fraction of requests answered 500 InternalError")
    parser.add_argument("--error-kinds", default="",
                        help=f"comma-separated kinds eligible for errors ({','.join(KINDS)})")
    parser.add_argument("--seed", type=int, default=None, help="random seed for failures")
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    kinds = [k.strip().upper() for k in args.error_kinds.split(",") if k.strip()]
    port = args.port or free_port()
    proxy = FaultProxy(args.upstream, latency=args.latency_ms / 1000.0,
                       error_rate=args.error_rate, internal_error_rate=args.internal_error_rate,
                       error_kinds=kinds or None, seed=args.seed, port=port)
    print(f"fault proxy on http://127.0.0.1:{port} -> {args.upstream}", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        proxy.serve_forever()


if __name__ == "__main__":
    main()

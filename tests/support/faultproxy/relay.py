"""The HTTP relay: one thread per client connection classifies each S3 request, sleeps the
latency, then fails it as the state decides or forwards it upstream on a connection of its
own, streaming both bodies in 1 MiB pieces."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import logging
import socket
import struct
import time
import urllib.parse
import uuid
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, NamedTuple

from .control import CONTROL_PREFIX, answer_control
from .kinds import classify
from .state import ProxyState

__all__ = ["RelayServer"]

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20
_HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
    "trailer", "trailers", "transfer-encoding", "upgrade", "expect", "proxy-connection",
})


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


class _Request(NamedTuple):
    kind: str
    key: str
    resource: str
    error: str | None


class _RelayHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: RelayServer

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
            hold = state.current().response_delay
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
        corrupt = request.kind == "GET" and response.status == 200 and state.take_corruption()
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
        opaque = self.server.state.current().opaque_etags
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
        name = urllib.parse.urlsplit(self.path).path[len(CONTROL_PREFIX):]
        body = b"".join(self._request_body())
        self._reply_json(*answer_control(self.server.state, self.command, name, body))

    def _reply_json(self, status: int, payload: Any) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)


class RelayServer(ThreadingHTTPServer):
    """The listening socket; one daemon thread per client connection, sharing ``state``."""

    daemon_threads = True
    request_queue_size = 256

    def __init__(self, address: tuple[str, int], state: ProxyState) -> None:
        self.state = state
        super().__init__(address, _RelayHandler)

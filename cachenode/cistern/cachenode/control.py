"""The node control API over HTTP: status, flush, drain, metrics.

Read-only calls (``GET /status``, ``GET /metrics``, ``GET /healthz``) are open; mutating calls
(``POST /flush``, ``POST /drain``, ``POST /resume``) need ``Authorization: Bearer <token>`` when
the daemon was given a token file. A non-loopback address needs a token.

Everything a client sends is untrusted and bounded (docs/security.md): the token is checked
before a byte of a body is read, a body is at most ``MAX_BODY`` bytes and needs an exact
``Content-Length`` (no chunked bodies), the request line and headers together are at most
``MAX_HEAD`` bytes, a silent socket times out after ``IDLE_TIMEOUT`` seconds, at most
``MAX_CONNECTIONS`` connections are served at once, and numeric parameters must be finite and
within ``MAX_WAIT``. ``/status`` carries no credentials: user-info in any URL is masked.
"""

from __future__ import annotations

import hmac
import http.client
import ipaddress
import json
import logging
import math
import re
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, BinaryIO, Protocol
from urllib.parse import parse_qs, urlparse

__all__ = ["MAX_BODY", "MAX_HEAD", "ControlServer", "NodeControl", "is_loopback",
           "redact_userinfo"]

log = logging.getLogger(__name__)

MAX_BODY = 64 * 1024
"""Largest request body accepted (after authentication); the API reads none of it."""
MAX_HEAD = 16 * 1024
"""Largest request line plus headers."""
IDLE_TIMEOUT = 30.0
"""Seconds a connection may stay silent (mid-request or between keep-alive requests)."""
MAX_CONNECTIONS = 32
"""Connections served at once; more are closed at once."""
MAX_WAIT = 86400.0
"""Largest ``timeout``/``wait`` parameter, seconds."""
LINGER_BYTES = 1 << 20
"""After refusing a request with a body, bytes read and dropped (in 64 KiB pieces, nothing kept)
so that the client reads the refusal before the connection is reset."""
LINGER_TIMEOUT = 2.0


class NodeControl(Protocol):
    def status(self) -> dict[str, Any]: ...

    def flush(self, timeout: float) -> bool: ...

    def drain(self, wait: float) -> dict[str, Any]: ...

    def resume(self) -> dict[str, Any]: ...

    def metrics(self) -> bytes: ...


def is_loopback(host: str) -> bool:
    """True when *host* names only this machine (``localhost``, 127.0.0.0/8, ``::1``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)[^/\s@]*@")


def redact_userinfo(value: Any) -> Any:
    """Mask ``user:password@`` in every URL inside *value* (strings, lists, dicts)."""
    if isinstance(value, str):
        return _USERINFO.sub(r"\g<scheme>***@", value)
    if isinstance(value, dict):
        return {k: redact_userinfo(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_userinfo(v) for v in value]
    return value


class ControlServer:
    def __init__(self, node: NodeControl, host: str, port: int, token: str | None,
                 idle_timeout: float = IDLE_TIMEOUT) -> None:
        if token is not None and not token.strip():
            raise ValueError("the control token is empty")
        if token is None and not is_loopback(host):
            raise ValueError(f"control address {host}: a non-loopback address needs a token")
        self.node = node
        self.token = token
        self.idle_timeout = idle_timeout
        handler = _make_handler(self)
        self.httpd = _BoundedHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self.address = self.httpd.server_address
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="control",
                                        daemon=True)

    @property
    def url(self) -> str:
        host, port = str(self.address[0]), int(self.address[1])
        return f"http://{host}:{port}"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _BoundedHTTPServer(ThreadingHTTPServer):
    """A threading server that serves at most ``MAX_CONNECTIONS`` connections at once."""

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            log.warning("control: %d connections already open; refusing %s",
                        MAX_CONNECTIONS, client_address[0])
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class _HeadBudget:
    """Wraps a request's input so that the request line and headers stay within a budget."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw = raw
        self.left = MAX_HEAD

    def readline(self, limit: int = -1) -> bytes:
        want = self.left + 1 if limit < 0 else min(limit, self.left + 1)
        line = self.raw.readline(want)
        self.left -= len(line)
        if self.left < 0:
            raise http.client.LineTooLong(f"request head over {MAX_HEAD} bytes")
        return line

    def read(self, size: int) -> bytes:
        return self.raw.read(size)

    def close(self) -> None:
        self.raw.close()


class BadRequest(Exception):
    """A request this API refuses: its HTTP status and message."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def _make_handler(server: ControlServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "cistern-node"
        timeout = server.idle_timeout

        def setup(self) -> None:
            super().setup()
            self._head = _HeadBudget(self.rfile)  # type: ignore[arg-type]
            self.rfile = self._head  # type: ignore[assignment]

        def handle_one_request(self) -> None:
            self._head.left = MAX_HEAD
            try:
                super().handle_one_request()
            except http.client.LineTooLong:  # the request line itself; headers: parse_request
                self.requestline = self.request_version = self.command = ""
                self.close_connection = True
                self.send_error(431, "request head too large")

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            log.debug("control %s", format % args)

        def _send(self, code: int, body: bytes, content_type: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)

        def _json(self, code: int, data: dict[str, Any]) -> None:
            self._send(code, json.dumps(redact_userinfo(data), indent=1).encode() + b"\n",
                       "application/json")

        def _query(self) -> dict[str, str]:
            return {k: v[-1] for k, v in parse_qs(urlparse(self.path).query).items()}

        def _number(self, name: str, default: float) -> float:
            raw = self._query().get(name)
            if raw is None:
                return default
            try:
                value = float(raw)
            except ValueError:
                raise BadRequest(400, f"{name} must be a number of seconds") from None
            if not math.isfinite(value) or not 0 <= value <= MAX_WAIT:
                raise BadRequest(400, f"{name} must be between 0 and {MAX_WAIT:g} seconds")
            return value

        def _refuse(self, code: int, message: str) -> None:
            """Answer and close without reading the body (a lingering close, bounded)."""
            self.close_connection = True
            self._json(code, {"error": message})
            try:
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_WR)
                self.connection.settimeout(LINGER_TIMEOUT)
                dropped = 0
                while dropped < LINGER_BYTES:
                    piece = self.connection.recv(65536)
                    if not piece:
                        break
                    dropped += len(piece)
            except OSError:
                pass

        def _authorised(self) -> bool:
            if server.token is None:
                return True
            given = self.headers.get("Authorization", "")
            return hmac.compare_digest(given.encode(), f"Bearer {server.token}".encode())

        def _discard_body(self) -> None:
            """Read (and drop) a bounded body so that the connection can be reused."""
            if self.headers.get("Transfer-Encoding"):
                raise BadRequest(411, "a body needs a Content-Length (no Transfer-Encoding)")
            raw = self.headers.get("Content-Length")
            if raw is None:
                return
            if not raw.strip().isdigit():
                raise BadRequest(400, "Content-Length must be a non-negative integer")
            length = int(raw)
            if length > MAX_BODY:
                raise BadRequest(413, f"a body may have at most {MAX_BODY} bytes")
            self.rfile.read(length)

        def do_GET(self) -> None:  # noqa: N802
            route = urlparse(self.path).path
            if self.headers.get("Content-Length") or self.headers.get("Transfer-Encoding"):
                self.close_connection = True  # a GET body is never read; do not reuse
            if route == "/status":
                self._json(200, server.node.status())
            elif route == "/metrics":
                self._send(200, server.node.metrics(), "text/plain; version=0.0.4")
            elif route == "/healthz":
                self._json(200, {"ok": True})
            else:
                self._json(404, {"error": f"no such endpoint {route}"})

        def do_POST(self) -> None:  # noqa: N802
            if not self._authorised():
                self._refuse(401, "a valid bearer token is required")
                return
            try:
                self._discard_body()
            except BadRequest as exc:
                self._refuse(exc.code, str(exc))
                return
            route = urlparse(self.path).path
            actions: dict[str, Callable[[], None]] = {
                "/flush": self._flush, "/drain": self._drain, "/resume": self._resume}
            action = actions.get(route)
            if action is None:
                self._json(404, {"error": f"no such endpoint {route}"})
                return
            try:
                action()
            except BadRequest as exc:
                self._json(exc.code, {"error": str(exc)})

        def _flush(self) -> None:
            timeout = self._number("timeout", 3600.0)
            done = server.node.flush(timeout)
            status = server.node.status()
            status["flushed"] = done
            self._json(200 if done else 504, status)

        def _drain(self) -> None:
            self._json(200, server.node.drain(self._number("wait", 0.0)))

        def _resume(self) -> None:
            self._json(200, server.node.resume())

    return Handler

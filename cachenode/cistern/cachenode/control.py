"""The node control API over HTTP: status, flush, drain, metrics.

Read-only calls (``GET /status``, ``GET /metrics``, ``GET /healthz``) are open; mutating calls
(``POST /flush``, ``POST /drain``, ``POST /resume``) need ``Authorization: Bearer <token>`` when
the daemon was given a token file. Bind to loopback unless the operator must reach it.
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol
from urllib.parse import parse_qs, urlparse

__all__ = ["ControlServer", "NodeControl"]

log = logging.getLogger(__name__)


class NodeControl(Protocol):
    def status(self) -> dict[str, Any]: ...

    def flush(self, timeout: float) -> bool: ...

    def drain(self, wait: float) -> dict[str, Any]: ...

    def resume(self) -> dict[str, Any]: ...

    def metrics(self) -> bytes: ...


class ControlServer:
    def __init__(self, node: NodeControl, host: str, port: int, token: str | None) -> None:
        self.node = node
        self.token = token
        handler = _make_handler(self)
        self.httpd = ThreadingHTTPServer((host, port), handler)
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


def _make_handler(server: ControlServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "cistern-node"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            log.debug("control %s", format % args)

        def _send(self, code: int, body: bytes, content_type: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _json(self, code: int, data: dict[str, Any]) -> None:
            self._send(code, json.dumps(data, indent=1).encode() + b"\n", "application/json")

        def _query(self) -> dict[str, str]:
            return {k: v[-1] for k, v in parse_qs(urlparse(self.path).query).items()}

        def _number(self, name: str, default: float) -> float:
            raw = self._query().get(name)
            if raw is None:
                return default
            value = float(raw)
            if value < 0:
                raise ValueError(f"{name} must not be negative")
            return value

        def do_GET(self) -> None:  # noqa: N802
            route = urlparse(self.path).path
            if route == "/status":
                self._json(200, server.node.status())
            elif route == "/metrics":
                self._send(200, server.node.metrics(), "text/plain; version=0.0.4")
            elif route == "/healthz":
                self._json(200, {"ok": True})
            else:
                self._json(404, {"error": f"no such endpoint {route}"})

        def do_POST(self) -> None:  # noqa: N802
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(min(length, 1 << 16))
            if server.token is not None:
                given = self.headers.get("Authorization", "")
                if not hmac.compare_digest(given.encode(), f"Bearer {server.token}".encode()):
                    self._json(401, {"error": "a valid bearer token is required"})
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
            except ValueError as exc:
                self._json(400, {"error": str(exc)})

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

"""HTTP health endpoints of ``cistern-csi``: liveness apart from readiness.

The CSI ``Probe`` is honest: a node plugin is ready only when a cache runs on its node. The
upstream livenessprobe sidecar turns ``ready=false`` into HTTP 500, so on a node without a cache
it would restart the plugin forever. ``--health-address`` serves instead:

* ``GET /healthz`` (liveness): 200 when the plugin's gRPC server answers ``GetPluginInfo`` on its
  own socket within the timeout (the process serves), 503 otherwise. A node without a cache is
  alive.
* ``GET /readyz`` (readiness, informational): the ``Probe`` verdict, 200 when ready, 503 with
  the reason otherwise.

Both go through the unix socket, so they exercise the same server, worker pool and interceptor
the kubelet and the provisioner use.
"""

from __future__ import annotations

import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc

from cistern.csi.proto import csi_pb2, csi_pb2_grpc

__all__ = ["HealthServer", "parse_address"]

log = logging.getLogger(__name__)


def parse_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``:PORT`` (all interfaces) -> ``(host, port)``."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"health address: expected HOST:PORT or :PORT, got {address!r}")
    return host or "0.0.0.0", int(port)


class HealthServer:
    """Serves /healthz and /readyz on ``address`` by calling the driver over ``socket``."""

    def __init__(self, address: tuple[str, int], socket: str, timeout: float) -> None:
        self.timeout = timeout
        self.channel = grpc.insecure_channel(f"unix://{socket}")
        self.identity = csi_pb2_grpc.IdentityStub(self.channel)
        health = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                if self.path == "/healthz":
                    code, text = health.liveness()
                elif self.path == "/readyz":
                    code, text = health.readiness()
                else:
                    code, text = 404, "not found: /healthz (liveness), /readyz (readiness)"
                body = (text + "\n").encode()
                self.send_response(code)
                self.send_header("Content-Type", "text/plain; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                log.debug("health: " + format, *args)

        self.httpd = ThreadingHTTPServer(address, Handler)
        self.httpd.daemon_threads = True
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="csi-health",
                                        daemon=True)

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    def liveness(self) -> tuple[int, str]:
        try:
            info = self.identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest(),
                                               timeout=self.timeout)
        except grpc.RpcError as exc:
            log.warning("liveness: the CSI server does not answer: %s", exc.code())
            return 503, f"the CSI server does not answer: {exc.code()}"
        return 200, f"ok: {info.name} {info.vendor_version}"

    def readiness(self) -> tuple[int, str]:
        try:
            answer = self.identity.Probe(csi_pb2.ProbeRequest(), timeout=self.timeout)
        except grpc.RpcError as exc:
            return 503, f"probe failed: {exc.code()}: {exc.details()}"
        if answer.HasField("ready") and not answer.ready.value:
            return 503, "not ready: no healthy cache on this node (see the plugin's log)"
        return 200, "ready"

    def start(self) -> None:
        self._thread.start()
        log.info("health endpoints on %s:%d (/healthz liveness, /readyz readiness)",
                 *self.httpd.server_address[:2])

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.channel.close()

"""node-driver-registrar's calls: GetPluginInfo and NodeGetInfo, then register with the kubelet.

Takes the real sidecar's flags (``--csi-address``, ``--kubelet-registration-path``,
``--http-endpoint``). Registration is a JSON file ``/registration/<driver>-reg.json`` read by
the kubelet double (the real one serves a registration socket there). ``/healthz`` on the
HTTP endpoint answers 200 while the driver's socket answers GetPluginInfo.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc

from cistern.csi.proto import csi_pb2, csi_pb2_grpc
from support.kubelet.doubles import container_path


def _address(endpoint: str) -> str:
    return endpoint if endpoint.startswith("unix:") else f"unix://{endpoint}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="node-driver-registrar (test double)")
    parser.add_argument("--csi-address", required=True)
    parser.add_argument("--kubelet-registration-path", required=True)
    parser.add_argument("--http-endpoint", default="")
    parser.add_argument("--registration-dir", default="/registration")
    args, _ = parser.parse_known_args(argv)
    channel = grpc.insecure_channel(_address(args.csi_address))
    identity = csi_pb2_grpc.IdentityStub(channel)
    node = csi_pb2_grpc.NodeStub(channel)
    while True:  # the real registrar retries until the driver's socket answers
        try:
            info = identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest(), timeout=5)
            node_info = node.NodeGetInfo(csi_pb2.NodeGetInfoRequest(), timeout=5)
            break
        except grpc.RpcError as exc:
            print(f"registrar: waiting for the driver at {args.csi_address}: "
                  f"{exc.code().name}", file=sys.stderr, flush=True)
            time.sleep(0.5)
    print(f"registrar: driver {info.name} {info.vendor_version}, node {node_info.node_id}, "
          f"topology {dict(node_info.accessible_topology.segments)}", file=sys.stderr,
          flush=True)
    registration = os.path.join(container_path(args.registration_dir), f"{info.name}-reg.json")
    partial = registration + ".part"
    with open(partial, "w") as out:
        json.dump({"name": info.name, "endpoint": args.kubelet_registration_path,
                   "versions": ["1.0.0"], "nodeId": node_info.node_id}, out)
    os.replace(partial, registration)
    if not args.http_endpoint:
        signal.pause()  # until the runner stops this container
    host, _, port = args.http_endpoint.rpartition(":")

    class Health(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            try:
                identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest(), timeout=5)
                code = 200
            except grpc.RpcError:
                code = 503
            self.send_response(code if self.path == "/healthz" else 404)
            self.end_headers()

        def log_message(self, *_: object) -> None:
            return

    ThreadingHTTPServer((host or "0.0.0.0", int(port)), Health).serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())

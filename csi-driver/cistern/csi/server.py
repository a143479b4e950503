"""Assemble the gRPC server: Identity always, Node and/or Controller by mode."""

from __future__ import annotations

import logging
import os
import stat
from concurrent.futures import ThreadPoolExecutor

import grpc

from cistern.csi.access import AccessPolicies
from cistern.csi.caches import CacheMounts
from cistern.csi.controller import ControllerService
from cistern.csi.identity import IdentityService
from cistern.csi.interceptor import LoggingInterceptor
from cistern.csi.node import NodeService
from cistern.csi.proto import csi_pb2_grpc
from cistern.csi.registry import VolumeRegistry
from cistern.csi.settings import DriverSettings, socket_path

__all__ = ["build_server"]

log = logging.getLogger(__name__)


def _prepare_socket(path: str) -> None:
    os.makedirs(os.path.dirname(path) or "/", exist_ok=True)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise FileExistsError(f"endpoint {path} exists and is not a socket; refusing to remove it")
    os.unlink(path)  # a stale socket from a previous run


def build_server(settings: DriverSettings) -> grpc.Server:
    """A started-ready (not yet started) server listening on the settings' unix socket."""
    caches = CacheMounts(settings.mount_root, settings.health_timeout)
    server = grpc.server(ThreadPoolExecutor(max_workers=settings.workers,
                                            thread_name_prefix="csi"),
                         interceptors=[LoggingInterceptor()])
    csi_pb2_grpc.add_IdentityServicer_to_server(IdentityService(settings, caches), server)
    policies = AccessPolicies(settings.access_dir)
    if settings.runs_node:
        csi_pb2_grpc.add_NodeServicer_to_server(NodeService(settings, caches, policies), server)
    if settings.runs_controller:
        registry = VolumeRegistry(settings.state_file or None)
        csi_pb2_grpc.add_ControllerServicer_to_server(
            ControllerService(settings, caches, policies, registry), server)
    path = socket_path(settings.endpoint)
    _prepare_socket(path)
    server.add_insecure_port(f"unix://{path}")
    log.info("CSI %s service(s) for node %s on unix://%s (mount root %s)", settings.mode,
             settings.node_id or "-", path, settings.mount_root)
    return server

"""The CSI Identity service: who the plugin is, what it offers, whether it is ready."""

from __future__ import annotations

import logging

import grpc
from google.protobuf import wrappers_pb2

from cistern.csi.caches import CacheMounts
from cistern.csi.errors import CSIError, grpc_boundary
from cistern.csi.mounts import read_mount_table
from cistern.csi.proto import csi_pb2, csi_pb2_grpc
from cistern.csi.settings import DRIVER_NAME, DriverSettings

__all__ = ["IdentityService"]

log = logging.getLogger(__name__)
Service = csi_pb2.PluginCapability.Service


class IdentityService(csi_pb2_grpc.IdentityServicer):
    def __init__(self, settings: DriverSettings, caches: CacheMounts) -> None:
        self.settings = settings
        self.caches = caches

    @grpc_boundary
    def GetPluginInfo(self, request: csi_pb2.GetPluginInfoRequest,
                      context: grpc.ServicerContext) -> csi_pb2.GetPluginInfoResponse:
        return csi_pb2.GetPluginInfoResponse(name=DRIVER_NAME,
                                             vendor_version=self.settings.version,
                                             manifest={"mode": self.settings.mode})

    @grpc_boundary
    def GetPluginCapabilities(self, request: csi_pb2.GetPluginCapabilitiesRequest,
                              context: grpc.ServicerContext
                              ) -> csi_pb2.GetPluginCapabilitiesResponse:
        types = [Service.VOLUME_ACCESSIBILITY_CONSTRAINTS]
        if self.settings.runs_controller:
            types.insert(0, Service.CONTROLLER_SERVICE)
        return csi_pb2.GetPluginCapabilitiesResponse(capabilities=[
            csi_pb2.PluginCapability(service=Service(type=t)) for t in types])

    @grpc_boundary
    def Probe(self, request: csi_pb2.ProbeRequest,
              context: grpc.ServicerContext) -> csi_pb2.ProbeResponse:
        """Ready when every cache mounted on this node answers, and at least one does.

        The controller alone needs no cache and is always ready.
        """
        if not self.settings.runs_node:
            return csi_pb2.ProbeResponse(ready=wrappers_pb2.BoolValue(value=True))
        table = read_mount_table()
        healthy, problems = [], []
        for name in self.caches.names():
            try:
                self.caches.require(name, table)
                healthy.append(name)
            except CSIError as exc:
                problems.append(exc.message)
        ready = bool(healthy) and not problems
        if not ready:
            log.info("probe: not ready: %s", "; ".join(problems) or
                     f"no cache is mounted under {self.caches.root}")
        return csi_pb2.ProbeResponse(ready=wrappers_pb2.BoolValue(value=ready))

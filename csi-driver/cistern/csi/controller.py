"""The CSI Controller service: dynamic provisioning of directories in a WriteCache's namespace.

CreateVolume derives the volume from its request: the volume id ``<cache-key>/<dir>`` follows
from the StorageClass parameters ``writeCache`` (and ``writeCacheNamespace``, default: the
PVC's namespace) and the PVC (``<namespace>/<pvc>-<uid8>`` when the provisioner passes PVC
metadata, else the CO's volume name), bounded to the spec's 128 bytes by truncating and adding
a hash, so a repeated call with the same name returns the same volume; the registry answers a
repeat with an incompatible capacity with ALREADY_EXISTS. The PVC's namespace must be admitted
by the cache's access policy (PERMISSION_DENIED). The directory is created on first publish.

DeleteVolume removes the directory (and so, through the cache, its objects) and is only ever
called by the CO for volumes whose reclaim policy is Delete. It needs the cache mounted where
the controller runs; elsewhere it fails with FAILED_PRECONDITION and deletes nothing.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
import shutil

import grpc

from cistern.csi.access import AccessPolicies
from cistern.csi.caches import CacheMounts, call_with_timeout
from cistern.csi.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
    grpc_boundary,
)
from cistern.csi.locks import OperationLocks
from cistern.csi.proto import csi_pb2, csi_pb2_grpc
from cistern.csi.registry import VolumeRegistry
from cistern.csi.settings import DriverSettings, topology_key
from cistern.csi.volumes import (
    CONTEXT_NAMESPACE,
    CONTEXT_PATH,
    CONTEXT_WRITE_CACHE,
    VolumeRef,
    capabilities_supported,
    check_capability,
    parse_volume_id,
    resolve_volume,
    validate_dir,
    validate_namespace,
    validate_write_cache,
)
from cistern.writecache import cache_key

__all__ = ["PVC_NAME", "PVC_NAMESPACE", "ControllerService", "volume_for"]

log = logging.getLogger(__name__)
RPC = csi_pb2.ControllerServiceCapability.RPC

PVC_NAME = "csi.storage.k8s.io/pvc/name"
PVC_NAMESPACE = "csi.storage.k8s.io/pvc/namespace"
_PROVISIONER_PREFIX = "csi.storage.k8s.io/"
_MAX_ID = 128
_BANNED = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_PV_UID = re.compile(r"pvc-([0-9a-f]{8})")


def _truncate_utf8(text: str, limit: int) -> str:
    return text.encode()[:limit].decode(errors="ignore")


def volume_for(name: str, parameters: dict[str, str]) -> tuple[VolumeRef, dict[str, str]]:
    """The volume CreateVolume(name, parameters) provisions and its volume_context;
    deterministic (idempotency). The id is at most 128 bytes for any name of up to 128."""
    write_cache = parameters.get(CONTEXT_WRITE_CACHE, "")
    if not write_cache:
        raise InvalidArgument(f"parameters.{CONTEXT_WRITE_CACHE} is required: the StorageClass "
                              f"names the WriteCache its volumes live in")
    validate_write_cache(write_cache, f"parameters.{CONTEXT_WRITE_CACHE}")
    unknown = sorted(k for k in parameters if k not in (CONTEXT_WRITE_CACHE, CONTEXT_NAMESPACE)
                     and not k.startswith(_PROVISIONER_PREFIX))
    if unknown:
        raise InvalidArgument(f"unknown StorageClass parameter(s) {', '.join(unknown)}; "
                              f"Cistern takes {CONTEXT_WRITE_CACHE} and {CONTEXT_NAMESPACE}")
    pvc, namespace = parameters.get(PVC_NAME, ""), parameters.get(PVC_NAMESPACE, "")
    if namespace:
        validate_namespace(namespace, f"parameters.{PVC_NAMESPACE}")
    cache_namespace = parameters.get(CONTEXT_NAMESPACE, "") or namespace
    if cache_namespace:
        validate_namespace(cache_namespace, f"parameters.{CONTEXT_NAMESPACE}")
    key = cache_key(cache_namespace, write_cache)
    if pvc and namespace:
        match = _PV_UID.match(name)
        suffix = match.group(1) if match else hashlib.sha256(name.encode()).hexdigest()[:8]
        base = f"{namespace}/{pvc}-{suffix}"
    else:
        base = name.replace("/", "-")
    if base in (".", "..") or len(f"{key}/{base}".encode()) > _MAX_ID:
        # Keep a readable prefix, make it unique with a hash of the CO's name.
        budget = _MAX_ID - len(key) - 1 - 17
        base = (f"{_truncate_utf8(base, budget).rstrip('/')}-"
                f"{hashlib.sha256(name.encode()).hexdigest()[:16]}")
    ref = VolumeRef(key, validate_dir(base, "name"))
    context = {CONTEXT_WRITE_CACHE: write_cache, CONTEXT_PATH: ref.dir}
    if cache_namespace:
        context[CONTEXT_NAMESPACE] = cache_namespace
    return ref, context


class ControllerService(csi_pb2_grpc.ControllerServicer):
    def __init__(self, settings: DriverSettings, caches: CacheMounts,
                 policies: AccessPolicies, registry: VolumeRegistry) -> None:
        self.settings = settings
        self.caches = caches
        self.policies = policies
        self.registry = registry
        self.locks = OperationLocks()

    @grpc_boundary
    def ControllerGetCapabilities(self, request: csi_pb2.ControllerGetCapabilitiesRequest,
                                  context: grpc.ServicerContext
                                  ) -> csi_pb2.ControllerGetCapabilitiesResponse:
        types = (RPC.CREATE_DELETE_VOLUME, RPC.SINGLE_NODE_MULTI_WRITER)
        return csi_pb2.ControllerGetCapabilitiesResponse(capabilities=[
            csi_pb2.ControllerServiceCapability(rpc=RPC(type=t)) for t in types])

    @grpc_boundary
    def CreateVolume(self, request: csi_pb2.CreateVolumeRequest,
                     context: grpc.ServicerContext) -> csi_pb2.CreateVolumeResponse:
        if not request.name:
            raise InvalidArgument("name is required")
        if _BANNED.search(request.name):
            raise InvalidArgument("name contains control characters")
        if not request.volume_capabilities:
            raise InvalidArgument("volume_capabilities is required")
        for i, cap in enumerate(request.volume_capabilities):
            check_capability(cap, f"volume_capabilities[{i}]")
        if request.HasField("volume_content_source"):
            raise InvalidArgument("volume_content_source: Cistern cannot clone volumes or "
                                  "restore snapshots")
        capacity = self._capacity(request)
        ref, volume_context = volume_for(request.name, dict(request.parameters))
        pvc_namespace = request.parameters.get(PVC_NAMESPACE, "")
        if pvc_namespace:
            self.policies.check(ref.cache, pvc_namespace, f"PVC {pvc_namespace}/"
                                f"{request.parameters.get(PVC_NAME, request.name)}")
        topology = self._topology(ref, request.accessibility_requirements)
        with self.locks.hold(request.name):
            made = self.registry.claim(request.name, ref.volume_id, capacity,
                                       request.capacity_range.required_bytes,
                                       request.capacity_range.limit_bytes)
        log.info("provisioned volume %s for %s (capacity %d, %s)", ref.volume_id, request.name,
                 made.capacity, "pinned to cache nodes" if topology else "no topology")
        return csi_pb2.CreateVolumeResponse(volume=csi_pb2.Volume(
            volume_id=ref.volume_id,
            capacity_bytes=made.capacity,
            volume_context=volume_context,
            accessible_topology=topology))

    @staticmethod
    def _topology(ref: VolumeRef,
                  requirement: csi_pb2.TopologyRequirement) -> list[csi_pb2.Topology]:
        """Pin the volume to nodes labelled ``csi.cistern.dev/<writecache>=true``, but only
        when the CO's topology shows that key.

        Node plugins report a WriteCache's key only if its cache existed when the kubelet
        registered them; a volume pinned to a key the CO has not seen could never be used. A
        volume without topology may land on a node without the cache, where publishing fails
        with NOT_FOUND and says so.
        """
        key = topology_key(ref.cache)
        mentioned = [t for t in (*requirement.requisite, *requirement.preferred)
                     if key in t.segments]
        if not mentioned:
            return []
        if not any(t.segments[key] == "true" for t in mentioned):
            raise ResourceExhausted(f"no node in the requested topology runs cache "
                                    f"{ref.cache!r} (topology key {key})")
        return [csi_pb2.Topology(segments={key: "true"})]

    @staticmethod
    def _capacity(request: csi_pb2.CreateVolumeRequest) -> int:
        """A volume is a directory in a cache backed by object storage: any size fits, so the
        reported capacity is the one asked for (required, else limit, else 0 = unknown)."""
        if not request.HasField("capacity_range"):
            return 0
        required = request.capacity_range.required_bytes
        limit = request.capacity_range.limit_bytes
        if required < 0 or limit < 0:
            raise InvalidArgument("capacity_range: bytes must not be negative")
        if limit and required > limit:
            raise InvalidArgument(f"capacity_range: required_bytes {required} exceeds "
                                  f"limit_bytes {limit}")
        return required or limit

    @grpc_boundary
    def DeleteVolume(self, request: csi_pb2.DeleteVolumeRequest,
                     context: grpc.ServicerContext) -> csi_pb2.DeleteVolumeResponse:
        if not request.volume_id:
            raise InvalidArgument("volume_id is required")
        ref = parse_volume_id(request.volume_id)
        if ref is None:
            log.info("delete: %r is not a Cistern volume id; nothing to delete",
                     request.volume_id)
            return csi_pb2.DeleteVolumeResponse()
        with self.locks.hold(request.volume_id):
            try:
                cache = self.caches.require(ref.cache)
            except NotFound as exc:
                raise FailedPrecondition(
                    f"cannot delete volume {ref.volume_id} here: {exc.message} (the controller "
                    f"deletes through the cache mount; run it where the cache runs)") from exc
            path = os.path.join(cache.path, ref.dir)
            if not os.path.lexists(path):
                log.info("delete: volume %s is already gone", ref.volume_id)
                self.registry.forget(ref.volume_id)
                return csi_pb2.DeleteVolumeResponse()
            try:
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path)
                else:
                    os.unlink(path)
            except OSError as exc:
                raise Unavailable(f"deleting volume {ref.volume_id} at {path} failed: "
                                  f"{exc.strerror or exc}") from exc
            # Empty parents created for this volume (<namespace>/) go too; others stay.
            parent = os.path.dirname(path)
            while os.path.normpath(parent) != os.path.normpath(cache.path):
                try:
                    call_with_timeout(functools.partial(os.rmdir, parent),
                                      self.caches.health_timeout, parent)
                except (OSError, TimeoutError):
                    break
                parent = os.path.dirname(parent)
            self.registry.forget(ref.volume_id)
        log.info("deleted volume %s (%s)", ref.volume_id, path)
        return csi_pb2.DeleteVolumeResponse()

    @grpc_boundary
    def ValidateVolumeCapabilities(self, request: csi_pb2.ValidateVolumeCapabilitiesRequest,
                                   context: grpc.ServicerContext
                                   ) -> csi_pb2.ValidateVolumeCapabilitiesResponse:
        if not request.volume_id:
            raise InvalidArgument("volume_id is required")
        if not request.volume_capabilities:
            raise InvalidArgument("volume_capabilities is required")
        ref = resolve_volume(request.volume_id, request.volume_context)
        if ref is None:
            raise NotFound(f"volume {request.volume_id!r} is not a Cistern volume")
        reason = capabilities_supported(request.volume_capabilities)
        if reason is not None:
            return csi_pb2.ValidateVolumeCapabilitiesResponse(message=reason)
        confirmed = csi_pb2.ValidateVolumeCapabilitiesResponse.Confirmed(
            volume_context=dict(request.volume_context),
            volume_capabilities=list(request.volume_capabilities),
            parameters=dict(request.parameters))
        return csi_pb2.ValidateVolumeCapabilitiesResponse(confirmed=confirmed)

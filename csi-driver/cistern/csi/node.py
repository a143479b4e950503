"""The CSI Node service: bind-mount a directory of the node's cache mount into a pod.

NodePublishVolume binds ``<mount-root>/<cache-key>/<dir>`` onto the target path (always
``nosuid,nodev``), creating the directory on first use (mode 2775, group ``volume_mount_group``
= the pod's fsGroup); NodeUnpublishVolume unmounts and removes the target. Both decide
"already done" from the mount table, so repeating a call is harmless. A cache that is down or
broken is an error, never an empty directory in the pod. The pod's namespace (``podInfoOnMount``)
must be admitted by the cache's access policy, else PERMISSION_DENIED.
"""

from __future__ import annotations

import errno
import logging
import os
import posixpath
from collections.abc import Mapping

import grpc

from cistern.csi.access import AccessPolicies
from cistern.csi.caches import CACHE_FSTYPE, CacheMounts, HealthyCache, call_with_timeout
from cistern.csi.confine import ConfinementError, fd_path, open_beneath
from cistern.csi.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
    grpc_boundary,
)
from cistern.csi.locks import OperationLocks
from cistern.csi.mounts import bind_mount, read_mount_table, unmount
from cistern.csi.proto import csi_pb2, csi_pb2_grpc
from cistern.csi.settings import DriverSettings, topology_key
from cistern.csi.volumes import (
    CONTEXT_POD_NAMESPACE,
    EPHEMERAL_CONTEXT,
    READ_ONLY_MODES,
    VolumeRef,
    check_capability,
    parse_volume_id,
    resolve_volume,
)

__all__ = ["VOLUME_DIR_MODE", "NodeService"]

log = logging.getLogger(__name__)
RPC = csi_pb2.NodeServiceCapability.RPC
#: New volume directories: owner root, group the pod's fsGroup (``volume_mount_group``),
#: group-writable and setgid so that files made inside keep that group; the bind mount confines
#: a pod to its own directory. Never world-writable.
VOLUME_DIR_MODE = 0o2775
_DEAD_FS = {errno.ENOTCONN, errno.ECONNABORTED, errno.EIO, errno.ESHUTDOWN}


def _required(value: str, name: str) -> str:
    if not value:
        raise InvalidArgument(f"{name} is required")
    return value


def _absolute(path: str, name: str) -> str:
    _required(path, name)
    if not path.startswith("/") or "\x00" in path:
        raise InvalidArgument(f"{name}: expected an absolute path, got {path!r}")
    return os.path.normpath(path)


def _mount_group(value: str) -> int | None:
    """``volume_mount_group`` (the pod's fsGroup) as a gid; None when not given."""
    if not value:
        return None
    if not value.isdigit() or int(value) > 0xFFFFFFFE:
        raise InvalidArgument(f"volume_mount_group: expected a numeric group id, got {value!r}")
    return int(value)


def _unknown_volume(volume_id: str) -> NotFound:
    return NotFound(f"volume {volume_id!r} is not a Cistern volume: expected an id "
                    f"<writecache>/<dir> or volume_context writeCache and path")


class NodeService(csi_pb2_grpc.NodeServicer):
    def __init__(self, settings: DriverSettings, caches: CacheMounts,
                 policies: AccessPolicies) -> None:
        self.settings = settings
        self.caches = caches
        self.policies = policies
        self.locks = OperationLocks()

    # ------------------------------------------------------------------ info

    @grpc_boundary
    def NodeGetInfo(self, request: csi_pb2.NodeGetInfoRequest,
                    context: grpc.ServicerContext) -> csi_pb2.NodeGetInfoResponse:
        segments = {topology_key(name): "true" for name in self.caches.names()}
        return csi_pb2.NodeGetInfoResponse(
            node_id=self.settings.node_id,
            accessible_topology=csi_pb2.Topology(segments=segments))

    @grpc_boundary
    def NodeGetCapabilities(self, request: csi_pb2.NodeGetCapabilitiesRequest,
                            context: grpc.ServicerContext
                            ) -> csi_pb2.NodeGetCapabilitiesResponse:
        types = (RPC.GET_VOLUME_STATS, RPC.VOLUME_CONDITION, RPC.SINGLE_NODE_MULTI_WRITER,
                 RPC.VOLUME_MOUNT_GROUP)
        return csi_pb2.NodeGetCapabilitiesResponse(capabilities=[
            csi_pb2.NodeServiceCapability(rpc=RPC(type=t)) for t in types])

    # --------------------------------------------------------------- publish

    @grpc_boundary
    def NodePublishVolume(self, request: csi_pb2.NodePublishVolumeRequest,
                          context: grpc.ServicerContext) -> csi_pb2.NodePublishVolumeResponse:
        volume_id = _required(request.volume_id, "volume_id")
        target = _absolute(request.target_path, "target_path")
        if not request.HasField("volume_capability"):
            raise InvalidArgument("volume_capability is required")
        cap = request.volume_capability
        check_capability(cap)
        flags = tuple(f for f in cap.mount.mount_flags if f not in ("ro", "rw"))
        read_only = (request.readonly or cap.access_mode.mode in READ_ONLY_MODES
                     or "ro" in cap.mount.mount_flags)
        group = _mount_group(cap.mount.volume_mount_group)
        ref = resolve_volume(volume_id, request.volume_context)
        if ref is None:
            raise _unknown_volume(volume_id)
        self._check_access(ref, volume_id, request.volume_context)
        with self.locks.hold(target):
            table = read_mount_table()
            cache = self.caches.require(ref.cache, table)
            expected_root = posixpath.normpath(posixpath.join(cache.entry.root, ref.dir))
            existing = table.at(target)
            if existing is not None:
                same = existing.root == expected_root and existing.read_only == read_only
                if same and existing.device == cache.entry.device:
                    log.info("volume %s already published at %s", volume_id, target)
                    return csi_pb2.NodePublishVolumeResponse()
                if not (same and existing.fstype == CACHE_FSTYPE
                        and self._is_dead(target)):
                    raise AlreadyExists(
                        f"{target} is already mounted ({existing.fstype} {existing.root}, "
                        f"{'ro' if existing.read_only else 'rw'}), which is not volume "
                        f"{volume_id} ({ref.cache}:/{ref.dir}, "
                        f"{'ro' if read_only else 'rw'})")
                # The volume's bind from before the daemon restarted: its FUSE connection is
                # dead. Replace it with a bind of the new cache mount.
                log.warning("volume %s at %s is bound to a dead cache connection; re-publishing "
                            "onto the restarted cache", volume_id, target)
                unmount(target)
            source = self._open_volume_dir(cache, ref, group)
            try:
                self._ensure_target_dir(target)
                bind_mount(fd_path(source), target, read_only=read_only, flags=flags)
            except OSError as exc:
                if exc.errno in _DEAD_FS:
                    raise Unavailable(f"cache mount of WriteCache {ref.cache!r} broke "
                                      f"while publishing {volume_id}: {exc.strerror}") from exc
                raise
            finally:
                os.close(source)
            self._verify_published(target, cache, expected_root, volume_id)
        log.info("published volume %s (%s/%s) at %s%s", volume_id, cache.path, ref.dir, target,
                 " read-only" if read_only else "")
        return csi_pb2.NodePublishVolumeResponse()

    def _check_access(self, ref: VolumeRef, volume_id: str, context: Mapping[str, str]) -> None:
        """The pod's namespace must be admitted by the cache's policy. An inline volume
        without one is refused (the CSIDriver object sets podInfoOnMount); a PV without one
        was admitted by CreateVolume or made by a cluster admin."""
        namespace = context.get(CONTEXT_POD_NAMESPACE, "")
        if namespace:
            self.policies.check(ref.cache, namespace, f"volume {volume_id}")
        elif context.get(EPHEMERAL_CONTEXT) == "true":
            raise PermissionDenied(f"inline volume {volume_id} of cache {ref.cache!r}: the "
                                   f"pod's namespace is unknown (the CSIDriver object needs "
                                   f"podInfoOnMount: true)")

    @staticmethod
    def _open_volume_dir(cache: HealthyCache, ref: VolumeRef, group: int | None) -> int:
        """An O_PATH descriptor of ``<cache>/<dir>``, created (mode 2775, group ``group``) on
        first use.

        Walked without following symlinks, so the directory is inside the cache namespace.
        """
        try:
            return open_beneath(str(cache.path), ref.dir, create_mode=VOLUME_DIR_MODE,
                                group=group)
        except ConfinementError as exc:
            raise FailedPrecondition(f"volume {ref.volume_id} cannot be published: "
                                     f"{exc.strerror}") from exc
        except OSError as exc:
            if exc.errno in _DEAD_FS:
                raise Unavailable(f"cache mount of WriteCache {ref.cache!r} broke: "
                                  f"{exc.strerror}") from exc
            raise FailedPrecondition(f"cannot create the directory of volume {ref.volume_id} "
                                     f"in {cache.path}: {exc.strerror}") from exc

    def _is_dead(self, path: str) -> bool:
        """True if the FUSE connection behind ``path`` is gone (its daemon exited)."""
        try:
            call_with_timeout(lambda: os.statvfs(path), self.settings.health_timeout, path)
        except OSError as exc:
            return exc.errno in _DEAD_FS
        except TimeoutError:
            return False
        return False

    @staticmethod
    def _ensure_target_dir(target: str) -> None:
        try:
            os.makedirs(target, exist_ok=True)
        except FileExistsError as exc:
            raise FailedPrecondition(f"target_path {target} exists and is not a "
                                     f"directory") from exc

    @staticmethod
    def _verify_published(target: str, cache: HealthyCache, expected_root: str,
                          volume_id: str) -> None:
        """Never leave anything but the cache at the target: check the mount table."""
        entry = read_mount_table().at(target)
        if (entry is None or entry.fstype != CACHE_FSTYPE or entry.device != cache.entry.device
                or entry.root != expected_root):
            if entry is not None:
                unmount(target)
            raise Unavailable(f"publishing {volume_id} at {target} did not produce a mount of "
                              f"the cache (found {entry.fstype if entry else 'nothing'}); "
                              f"refusing to hand out anything else")

    @grpc_boundary
    def NodeUnpublishVolume(self, request: csi_pb2.NodeUnpublishVolumeRequest,
                            context: grpc.ServicerContext
                            ) -> csi_pb2.NodeUnpublishVolumeResponse:
        volume_id = _required(request.volume_id, "volume_id")
        target = _absolute(request.target_path, "target_path")
        with self.locks.hold(target):
            # Unmount whatever is stacked at the target. The mount table, not stat(): a bind of
            # a dead FUSE mount answers ENOTCONN to stat but unmounts fine.
            for _ in range(16):
                if read_mount_table().at(target) is None:
                    break
                unmount(target)
                log.info("unmounted %s (volume %s)", target, volume_id)
            else:
                raise FailedPrecondition(f"{target} is still mounted after 16 unmounts")
            if os.path.lexists(target):
                self._remove_target(target, volume_id)
                return csi_pb2.NodeUnpublishVolumeResponse()
            # Nothing was (or is any more) at the target. A well-formed id whose WriteCache has
            # no cache on this node names a volume that cannot exist here: NOT_FOUND. Ids made
            # up by the kubelet (inline volumes) carry no context here, so they get OK.
            ref = parse_volume_id(volume_id)
            if ref is not None and not os.path.isdir(self.caches.path_of(ref.cache)):
                raise NotFound(f"volume {volume_id}: WriteCache {ref.cache!r} has no cache "
                               f"on this node, and nothing is published at {target}")
        return csi_pb2.NodeUnpublishVolumeResponse()

    @staticmethod
    def _remove_target(target: str, volume_id: str) -> None:
        try:
            os.rmdir(target)
        except NotADirectoryError:
            os.unlink(target)
        except FileNotFoundError:
            pass
        except OSError as exc:
            if exc.errno != errno.ENOTEMPTY:
                raise
            # Files in the unmounted target were written beside the volume, not into it.
            log.warning("volume %s: target %s is not empty after unmount; leaving it for the "
                        "kubelet", volume_id, target)

    # ----------------------------------------------------------------- stats

    @grpc_boundary
    def NodeGetVolumeStats(self, request: csi_pb2.NodeGetVolumeStatsRequest,
                           context: grpc.ServicerContext
                           ) -> csi_pb2.NodeGetVolumeStatsResponse:
        volume_id = _required(request.volume_id, "volume_id")
        path = _absolute(request.volume_path, "volume_path")
        entry = read_mount_table().at(path)
        if entry is None or entry.fstype != CACHE_FSTYPE:
            what = "does not exist" if not os.path.lexists(path) else \
                "is not a published Cistern volume"
            raise NotFound(f"volume {volume_id}: {path} {what}")
        try:
            st = call_with_timeout(lambda: os.statvfs(path), self.settings.health_timeout,
                                   f"volume {path}")
        except (OSError, TimeoutError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            return csi_pb2.NodeGetVolumeStatsResponse(
                volume_condition=csi_pb2.VolumeCondition(
                    abnormal=True,
                    message=f"the cache behind {path} does not answer ({reason}); "
                            f"is the cache daemon running?"))
        unit = csi_pb2.VolumeUsage
        return csi_pb2.NodeGetVolumeStatsResponse(
            usage=[
                unit(unit=unit.BYTES, total=st.f_blocks * st.f_frsize,
                     available=st.f_bavail * st.f_frsize,
                     used=(st.f_blocks - st.f_bfree) * st.f_frsize),
                unit(unit=unit.INODES, total=st.f_files, available=st.f_favail,
                     used=st.f_files - st.f_ffree),
            ],
            volume_condition=csi_pb2.VolumeCondition(abnormal=False, message="healthy"))

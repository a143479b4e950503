"""The kubelet's side of CSI: find a registered driver, publish and unpublish pod volumes.

Registration: the node-driver-registrar double writes ``<kubeletDir>/plugins_registry/
<driver>-reg.json`` (name, endpoint, versions) after GetPluginInfo and NodeGetInfo succeed,
where the real one serves a registration socket the kubelet calls; the endpoint in it is a host
path, so it lies under the test root like every other host path.

Publish: target ``<kubeletDir>/pods/<uid>/volumes/kubernetes.io~csi/<pv or volume>/mount``
(the driver creates ``mount``; the kubelet only its parent), volume context = the PV's
``volumeAttributes`` (or the inline volume's) plus, when the CSIDriver says
``podInfoOnMount: true``, the pod's name, namespace, uid, service account and ``ephemeral``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from cistern.csi.proto import csi_pb2, csi_pb2_grpc
from support.kubelet.apiclient import ApiClient
from support.kubelet.pods import PodError

__all__ = ["POD_INFO_KEYS", "CsiKubelet", "Published"]

POD_INFO_KEYS = ("csi.storage.k8s.io/pod.name", "csi.storage.k8s.io/pod.namespace",
                 "csi.storage.k8s.io/pod.uid", "csi.storage.k8s.io/serviceAccount.name",
                 "csi.storage.k8s.io/ephemeral")
_ACCESS = {
    "ReadWriteOnce": csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER,
    "ReadWriteOncePod": csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_SINGLE_WRITER,
    "ReadOnlyMany": csi_pb2.VolumeCapability.AccessMode.MULTI_NODE_READER_ONLY,
    "ReadWriteMany": csi_pb2.VolumeCapability.AccessMode.MULTI_NODE_MULTI_WRITER,
}


@dataclass(frozen=True)
class Published:
    driver: str
    volume_id: str
    target: Path


class CsiKubelet:
    def __init__(self, api: ApiClient, host_root: Path, kubelet_dir: str,
                 timeout: float = 30.0) -> None:
        self.api = api
        self.host_root = host_root
        """Where the node's host paths lie (a registration names a host path)."""
        self.kubelet_dir = host_root / kubelet_dir.lstrip("/")
        self.timeout = timeout
        self.published: dict[tuple[str, str], Published] = {}
        """(pod uid, volume name) -> what was published."""

    def registered(self, driver: str) -> dict[str, Any] | None:
        path = self.kubelet_dir / "plugins_registry" / f"{driver}-reg.json"
        try:
            return dict(json.loads(path.read_text()))
        except (OSError, ValueError):
            return None

    def _stub(self, driver: str) -> tuple[grpc.Channel, csi_pb2_grpc.NodeStub]:
        registration = self.registered(driver)
        if registration is None:
            raise PodError("FailedMount", f"driver name {driver} not found in the list of "
                           f"registered CSI drivers")
        endpoint = self.host_root / str(registration["endpoint"]).lstrip("/")
        channel = grpc.insecure_channel(f"unix://{endpoint}")
        return channel, csi_pb2_grpc.NodeStub(channel)

    def probe(self, driver: str) -> bool:
        """The registered driver's CSI Probe verdict (False while it cannot be asked)."""
        if self.registered(driver) is None:
            return False
        channel, _ = self._stub(driver)
        with channel:
            try:
                answer = csi_pb2_grpc.IdentityStub(channel).Probe(csi_pb2.ProbeRequest(),
                                                                  timeout=self.timeout)
            except grpc.RpcError:
                return False
        return not answer.HasField("ready") or answer.ready.value

    def _pod_info(self, driver: str, pod: dict[str, Any], ephemeral: bool) -> dict[str, str]:
        obj = self.api.get("csidrivers", driver)
        if obj is None:
            raise PodError("FailedMount", f"CSIDriver {driver} not found")
        if not (obj.get("spec") or {}).get("podInfoOnMount"):
            return {}
        meta = pod["metadata"]
        return dict(zip(POD_INFO_KEYS, (
            meta["name"], meta.get("namespace") or "default", meta["uid"],
            pod["spec"].get("serviceAccountName") or "default",
            "true" if ephemeral else "false"), strict=True))

    def publish(self, pod: dict[str, Any], volume: dict[str, Any]) -> Path:
        meta = pod["metadata"]
        namespace = meta.get("namespace") or "default"
        if "persistentVolumeClaim" in volume:
            claim = volume["persistentVolumeClaim"]["claimName"]
            pvc = self.api.get("persistentvolumeclaims", claim, namespace)
            if pvc is None:
                raise PodError("FailedMount", f'persistentvolumeclaim "{claim}" not found')
            pv_name = (pvc.get("spec") or {}).get("volumeName")
            pv = self.api.get("persistentvolumes", pv_name) if pv_name else None
            if pv is None or (pvc.get("status") or {}).get("phase") != "Bound":
                raise PodError("FailedMount", f'persistentvolumeclaim "{claim}" is not bound')
            source = pv["spec"]["csi"]
            driver, volume_id = source["driver"], source["volumeHandle"]
            context = dict(source.get("volumeAttributes") or {})
            read_only = bool(volume["persistentVolumeClaim"].get("readOnly")
                             or source.get("readOnly"))
            modes = pv["spec"].get("accessModes") or ["ReadWriteOnce"]
            fs_type = source.get("fsType", "")
            dir_name, ephemeral = pv_name, False
        else:
            source = volume["csi"]
            driver = source["driver"]
            volume_id = "csi-" + hashlib.sha256(
                f"{meta['uid']}{volume['name']}".encode()).hexdigest()
            context = dict(source.get("volumeAttributes") or {})
            read_only = bool(source.get("readOnly"))
            modes, fs_type = ["ReadWriteOnce"], source.get("fsType", "")
            dir_name, ephemeral = volume["name"], True
        context.update(self._pod_info(driver, pod, ephemeral))
        target = (self.kubelet_dir / "pods" / meta["uid"] / "volumes" / "kubernetes.io~csi"
                  / dir_name / "mount")
        target.parent.mkdir(parents=True, exist_ok=True)
        capability = csi_pb2.VolumeCapability(
            mount=csi_pb2.VolumeCapability.MountVolume(fs_type=fs_type),
            access_mode=csi_pb2.VolumeCapability.AccessMode(mode=_ACCESS[modes[0]]))
        channel, stub = self._stub(driver)
        with channel:
            try:
                stub.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
                    volume_id=volume_id, target_path=str(target), volume_capability=capability,
                    readonly=read_only, volume_context=context), timeout=self.timeout)
            except grpc.RpcError as exc:
                raise PodError("FailedMount", f"MountVolume.SetUp failed for volume "
                               f"{volume['name']!r}: rpc error: code = {exc.code().name} "
                               f"desc = {exc.details()}") from None
        self.published[meta["uid"], volume["name"]] = Published(driver, volume_id, target)
        return target

    def unpublish_pod(self, uid: str) -> list[str]:
        """NodeUnpublishVolume for every volume of the pod; returns the errors."""
        errors = []
        for key in [k for k in self.published if k[0] == uid]:
            published = self.published[key]
            try:
                channel, stub = self._stub(published.driver)
                with channel:
                    stub.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
                        volume_id=published.volume_id, target_path=str(published.target)),
                        timeout=self.timeout)
                del self.published[key]
            except (grpc.RpcError, PodError) as exc:
                errors.append(f"{key[1]}: {exc}")
        return errors

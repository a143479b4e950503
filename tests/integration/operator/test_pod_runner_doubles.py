"""The pod runner's stand-ins make the calls the real kubelet and external-provisioner make.

A recording CSI server on a unix socket answers; KMock holds the objects. The kubelet double
must pass the pod info ``podInfoOnMount: true`` promises; the provisioner double the
``--extra-create-metadata`` parameters, a PV bound to the claim, and DeleteVolume for a
Delete-policy PV whose claim is gone.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import kmock as kmock_lib
import pytest
import pytest_asyncio

from cistern.csi.proto import csi_pb2, csi_pb2_grpc
from support.kubelet import POD_INFO_KEYS, ApiClient, CsiKubelet
from support.kubelet.doubles.provisioner import Provisioner

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(60)]

DRIVER = "csi.example.dev"
RESOURCES = {
    "v1/pods": {"kind": "Pod", "namespaced": True},
    "v1/nodes": {"kind": "Node", "namespaced": False},
    "v1/persistentvolumeclaims": {"kind": "PersistentVolumeClaim", "namespaced": True,
                                  "subresources": {"status"}},
    "v1/persistentvolumes": {"kind": "PersistentVolume", "namespaced": False,
                             "subresources": {"status"}},
    "storage.k8s.io/v1/storageclasses": {"kind": "StorageClass", "namespaced": False},
    "storage.k8s.io/v1/csidrivers": {"kind": "CSIDriver", "namespaced": False},
}
VERBS = {"get", "list", "watch", "create", "patch", "update", "delete"}


class Recorder(csi_pb2_grpc.IdentityServicer, csi_pb2_grpc.NodeServicer,
               csi_pb2_grpc.ControllerServicer):
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def GetPluginInfo(self, request: Any, context: Any) -> Any:  # noqa: N802
        return csi_pb2.GetPluginInfoResponse(name=DRIVER, vendor_version="1")

    def Probe(self, request: Any, context: Any) -> Any:  # noqa: N802
        return csi_pb2.ProbeResponse()

    def NodeGetInfo(self, request: Any, context: Any) -> Any:  # noqa: N802
        return csi_pb2.NodeGetInfoResponse(node_id="node-1", accessible_topology=csi_pb2.Topology(
            segments={"topology.example.dev/zone": "a"}))

    def NodePublishVolume(self, request: Any, context: Any) -> Any:  # noqa: N802
        self.calls.append(("NodePublishVolume", request))
        return csi_pb2.NodePublishVolumeResponse()

    def NodeUnpublishVolume(self, request: Any, context: Any) -> Any:  # noqa: N802
        self.calls.append(("NodeUnpublishVolume", request))
        return csi_pb2.NodeUnpublishVolumeResponse()

    def CreateVolume(self, request: Any, context: Any) -> Any:  # noqa: N802
        self.calls.append(("CreateVolume", request))
        return csi_pb2.CreateVolumeResponse(volume=csi_pb2.Volume(
            volume_id=f"vol/{request.name}", capacity_bytes=request.capacity_range.required_bytes,
            volume_context={"attr": "1"}, accessible_topology=list(
                request.accessibility_requirements.preferred)))

    def DeleteVolume(self, request: Any, context: Any) -> Any:  # noqa: N802
        self.calls.append(("DeleteVolume", request))
        return csi_pb2.DeleteVolumeResponse()

    def named(self, method: str) -> list[Any]:
        return [request for name, request in self.calls if name == method]


@pytest.fixture()
def csi() -> Iterator[tuple[Recorder, Path]]:
    root = Path(tempfile.mkdtemp(prefix="doubles-", dir="/tmp"))
    socket = root / "csi.sock"
    recorder = Recorder()
    server = grpc.server(futures.ThreadPoolExecutor(4))
    csi_pb2_grpc.add_IdentityServicer_to_server(recorder, server)
    csi_pb2_grpc.add_NodeServicer_to_server(recorder, server)
    csi_pb2_grpc.add_ControllerServicer_to_server(recorder, server)
    server.add_insecure_port(f"unix://{socket}")
    server.start()
    try:
        yield recorder, root
    finally:
        server.stop(0).wait()
        shutil.rmtree(root, ignore_errors=True)


@pytest_asyncio.fixture()
async def api(kmock: Any) -> AsyncIterator[ApiClient]:
    for key, info in RESOURCES.items():
        kmock.resources[key] = kmock_lib.ResourceInfo(verbs=VERBS, **info)
    yield ApiClient(str(kmock.url))


async def test_kubelet_publishes_with_the_pod_info(api: ApiClient,
                                                   csi: tuple[Recorder, Path]) -> None:
    recorder, root = csi
    host = root / "host"
    registry = host / "var/lib/kubelet/plugins_registry"
    registry.mkdir(parents=True)
    # What the registrar double registers: a host path, resolved under the node's root.
    (host / "sock").symlink_to(root / "csi.sock")
    (registry / f"{DRIVER}-reg.json").write_text(json.dumps({"name": DRIVER,
                                                             "endpoint": "/sock"}))
    await asyncio.to_thread(api.create, "csidrivers", {
        "apiVersion": "storage.k8s.io/v1", "kind": "CSIDriver", "metadata": {"name": DRIVER},
        "spec": {"podInfoOnMount": True}})
    await asyncio.to_thread(api.create, "persistentvolumes", {
        "apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": "pv-1"},
        "spec": {"accessModes": ["ReadWriteMany"], "csi": {
            "driver": DRIVER, "volumeHandle": "vol/1", "volumeAttributes": {"attr": "1"}}}})
    await asyncio.to_thread(api.create, "persistentvolumeclaims", {
        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {"name": "data", "namespace": "team"}, "spec": {"volumeName": "pv-1"},
        "status": {"phase": "Bound"}}, "team")
    pod = {"metadata": {"name": "trainer", "namespace": "team", "uid": "u-1"},
           "spec": {"serviceAccountName": "runner"}}
    volume = {"name": "ckpt", "persistentVolumeClaim": {"claimName": "data"}}
    inline = {"name": "scratch", "csi": {"driver": DRIVER, "volumeAttributes": {"path": "x"}}}
    kubelet = CsiKubelet(api, host, "/var/lib/kubelet")

    target = await asyncio.to_thread(kubelet.publish, pod, volume)
    await asyncio.to_thread(kubelet.publish, pod, inline)
    assert target == host / "var/lib/kubelet/pods/u-1/volumes/kubernetes.io~csi/pv-1/mount"
    persistent, ephemeral = recorder.named("NodePublishVolume")
    assert (persistent.volume_id, persistent.target_path) == ("vol/1", str(target))
    assert dict(persistent.volume_context) == {
        "attr": "1", **dict(zip(POD_INFO_KEYS, ("trainer", "team", "u-1", "runner", "false"),
                                strict=True))}
    assert persistent.volume_capability.access_mode.mode == \
        csi_pb2.VolumeCapability.AccessMode.MULTI_NODE_MULTI_WRITER
    assert dict(ephemeral.volume_context)["csi.storage.k8s.io/ephemeral"] == "true"
    assert dict(ephemeral.volume_context)["path"] == "x"

    assert await asyncio.to_thread(kubelet.unpublish_pod, "u-1") == []
    assert sorted(r.target_path for r in recorder.named("NodeUnpublishVolume")) == sorted(
        r.target_path for r in recorder.named("NodePublishVolume"))


async def test_provisioner_passes_the_extra_create_metadata(
        api: ApiClient, csi: tuple[Recorder, Path]) -> None:
    recorder, root = csi
    await asyncio.to_thread(api.create, "storageclasses", {
        "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass", "metadata": {"name": "fast"},
        "provisioner": DRIVER, "parameters": {"writeCache": "wc"}, "reclaimPolicy": "Delete",
        "volumeBindingMode": "WaitForFirstConsumer"})
    claim = await asyncio.to_thread(api.create, "persistentvolumeclaims", {
        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {"name": "data", "namespace": "team", "uid": "c-1",
                     "annotations": {"volume.kubernetes.io/selected-node": "node-1"}},
        "spec": {"storageClassName": "fast", "accessModes": ["ReadWriteOnce"],
                 "resources": {"requests": {"storage": "2Gi"}}}}, "team")
    channel = grpc.insecure_channel(f"unix://{root / 'csi.sock'}")
    provisioner = Provisioner(api, channel, "node-1", extra_metadata=True, timeout=10)
    await asyncio.to_thread(provisioner.wait_for_driver)
    await asyncio.to_thread(provisioner.sync)

    (create,) = recorder.named("CreateVolume")
    pv_name = f"pvc-{claim['metadata']['uid']}"
    assert create.name == pv_name
    assert dict(create.parameters) == {
        "writeCache": "wc", "csi.storage.k8s.io/pvc/name": "data",
        "csi.storage.k8s.io/pvc/namespace": "team", "csi.storage.k8s.io/pv/name": pv_name}
    assert create.capacity_range.required_bytes == 2 * 2**30
    pv = await asyncio.to_thread(api.get, "persistentvolumes", pv_name)
    assert pv["spec"]["csi"]["volumeHandle"] == f"vol/{pv_name}"
    assert pv["spec"]["claimRef"]["name"] == "data"
    pvc = await asyncio.to_thread(api.get, "persistentvolumeclaims", "data", "team")
    assert pvc["spec"]["volumeName"] == pv_name and pvc["status"]["phase"] == "Bound"

    await asyncio.to_thread(api.delete, "persistentvolumeclaims", "data", "team")
    await asyncio.to_thread(provisioner.sync)
    assert [r.volume_id for r in recorder.named("DeleteVolume")] == [f"vol/{pv_name}"]
    assert await asyncio.to_thread(api.get, "persistentvolumes", pv_name) is None
    channel.close()

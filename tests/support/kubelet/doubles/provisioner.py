"""external-provisioner's calls, as the chart runs it (``--node-deployment``,
``--extra-create-metadata``), plus the PV controller's binding.

For each PVC of a StorageClass whose provisioner is the driver, scheduled to this node
(``volume.kubernetes.io/selected-node`` = ``$NODE_NAME``): CreateVolume(name ``pvc-<uid>``,
parameters = the StorageClass's + ``csi.storage.k8s.io/pvc/name``, ``pvc/namespace``,
``pv/name``, capacity, capabilities, the node's topology), then a PV bound to the claim. For
each PV of the driver whose claim is gone: DeleteVolume when the policy is Delete, then the PV
goes; with Retain it stays Released.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from typing import Any

import grpc

from cistern.csi.proto import csi_pb2, csi_pb2_grpc
from support.kubelet.apiclient import ApiClient, ApiError

SELECTED_NODE = "volume.kubernetes.io/selected-node"
_UNITS = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15,
          "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50}
_ACCESS = {
    "ReadWriteOnce": csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER,
    "ReadWriteOncePod": csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_SINGLE_WRITER,
    "ReadOnlyMany": csi_pb2.VolumeCapability.AccessMode.MULTI_NODE_READER_ONLY,
    "ReadWriteMany": csi_pb2.VolumeCapability.AccessMode.MULTI_NODE_MULTI_WRITER,
}


def quantity(value: str) -> int:
    match = re.fullmatch(r"(\d+)([kMGTP]i?|)", str(value))
    if not match:
        raise ValueError(f"unsupported quantity {value!r}")
    return int(match.group(1)) * _UNITS[match.group(2)]


class Provisioner:
    def __init__(self, api: ApiClient, csi: grpc.Channel, node: str, extra_metadata: bool,
                 timeout: float) -> None:
        self.api = api
        self.identity = csi_pb2_grpc.IdentityStub(csi)
        self.controller = csi_pb2_grpc.ControllerStub(csi)
        self.node_stub = csi_pb2_grpc.NodeStub(csi)
        self.node = node
        self.extra = extra_metadata
        self.timeout = timeout
        self.driver = ""
        self.topology: dict[str, str] = {}

    def wait_for_driver(self) -> None:
        """Like the sidecar: GetPluginInfo, then Probe until ready, then the node's topology."""
        while True:
            try:
                self.driver = self.identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest(),
                                                          timeout=5).name
                probe = self.identity.Probe(csi_pb2.ProbeRequest(), timeout=5)
                if not probe.HasField("ready") or probe.ready.value:
                    break
                print("provisioner: driver not ready yet", file=sys.stderr, flush=True)
            except grpc.RpcError as exc:
                print(f"provisioner: waiting for the driver: {exc.code().name} "
                      f"{exc.details()}", file=sys.stderr, flush=True)
            time.sleep(0.5)
        info = self.node_stub.NodeGetInfo(csi_pb2.NodeGetInfoRequest(), timeout=5)
        self.topology = dict(info.accessible_topology.segments)
        print(f"provisioner: driver {self.driver} ready on {self.node}, topology "
              f"{self.topology}", file=sys.stderr, flush=True)

    def sync(self) -> None:
        classes = {sc["metadata"]["name"]: sc for sc in self.api.list("storageclasses")
                   if sc.get("provisioner") == self.driver}
        for pvc in self.api.list("persistentvolumeclaims"):
            sc = classes.get((pvc.get("spec") or {}).get("storageClassName") or "")
            annotations = pvc["metadata"].get("annotations") or {}
            if (sc is not None and (pvc.get("status") or {}).get("phase") != "Bound"
                    and not pvc["spec"].get("volumeName")
                    and annotations.get(SELECTED_NODE) == self.node):
                self.provision(pvc, sc)
        claims = {(p["metadata"]["namespace"], p["metadata"]["name"])
                  for p in self.api.list("persistentvolumeclaims")}
        for pv in self.api.list("persistentvolumes"):
            csi = (pv.get("spec") or {}).get("csi") or {}
            ref = pv["spec"].get("claimRef") or {}
            if csi.get("driver") != self.driver or (ref.get("namespace"), ref.get("name")) in \
                    claims or not self._accessible_here(pv):
                continue
            if pv["spec"].get("persistentVolumeReclaimPolicy") == "Delete":
                self.delete(pv)
            elif (pv.get("status") or {}).get("phase") != "Released":
                self.api.patch("persistentvolumes", pv["metadata"]["name"],
                               {"status": {"phase": "Released"}}, subresource="status")

    def _accessible_here(self, pv: dict[str, Any]) -> bool:
        terms = (((pv["spec"].get("nodeAffinity") or {}).get("required") or {})
                 .get("nodeSelectorTerms") or [])
        return not terms or any(all(
            self.topology.get(e["key"]) in e.get("values", []) for e in t["matchExpressions"])
            for t in terms)

    def provision(self, pvc: dict[str, Any], sc: dict[str, Any]) -> None:
        meta = pvc["metadata"]
        pv_name = f"pvc-{meta['uid']}"
        parameters = dict(sc.get("parameters") or {})
        if self.extra:
            parameters.update({"csi.storage.k8s.io/pvc/name": meta["name"],
                               "csi.storage.k8s.io/pvc/namespace": meta["namespace"],
                               "csi.storage.k8s.io/pv/name": pv_name})
        modes = pvc["spec"].get("accessModes") or ["ReadWriteOnce"]
        request = csi_pb2.CreateVolumeRequest(
            name=pv_name, parameters=parameters,
            capacity_range=csi_pb2.CapacityRange(required_bytes=quantity(
                pvc["spec"]["resources"]["requests"]["storage"])),
            volume_capabilities=[csi_pb2.VolumeCapability(
                mount=csi_pb2.VolumeCapability.MountVolume(),
                access_mode=csi_pb2.VolumeCapability.AccessMode(mode=_ACCESS[m]))
                for m in modes],
            accessibility_requirements=csi_pb2.TopologyRequirement(
                requisite=[csi_pb2.Topology(segments=self.topology)],
                preferred=[csi_pb2.Topology(segments=self.topology)]))
        try:
            volume = self.controller.CreateVolume(request, timeout=self.timeout).volume
        except grpc.RpcError as exc:
            message = f"failed to provision volume with StorageClass " \
                      f"{sc['metadata']['name']!r}: rpc error: code = {exc.code().name} " \
                      f"desc = {exc.details()}"
            print(f"provisioner: {meta['namespace']}/{meta['name']}: {message}",
                  file=sys.stderr, flush=True)
            self.api.patch("persistentvolumeclaims", meta["name"], {"metadata": {
                "annotations": {"pod-runner/provisioning-failed": message}}}, meta["namespace"])
            return
        affinity = [{"matchExpressions": [{"key": k, "operator": "In", "values": [v]}
                                          for k, v in t.segments.items()]}
                    for t in volume.accessible_topology]
        pv = {"apiVersion": "v1", "kind": "PersistentVolume",
              "metadata": {"name": pv_name, "annotations": {
                  "pv.kubernetes.io/provisioned-by": self.driver}},
              "spec": {"capacity": {"storage": str(volume.capacity_bytes)},
                       "accessModes": modes,
                       "persistentVolumeReclaimPolicy": sc.get("reclaimPolicy", "Delete"),
                       "storageClassName": sc["metadata"]["name"],
                       "claimRef": {"kind": "PersistentVolumeClaim",
                                    "namespace": meta["namespace"], "name": meta["name"],
                                    "uid": meta["uid"]},
                       "csi": {"driver": self.driver, "volumeHandle": volume.volume_id,
                               "volumeAttributes": dict(volume.volume_context)},
                       **({"nodeAffinity": {"required": {"nodeSelectorTerms": affinity}}}
                          if affinity else {})},
              "status": {"phase": "Bound"}}
        self.api.create("persistentvolumes", pv)
        self.api.patch("persistentvolumeclaims", meta["name"], {"spec": {"volumeName": pv_name}},
                       meta["namespace"])
        self.api.patch("persistentvolumeclaims", meta["name"], {"status": {"phase": "Bound"}},
                       meta["namespace"], "status")
        print(f"provisioner: {meta['namespace']}/{meta['name']} -> {pv_name} "
              f"({volume.volume_id})", file=sys.stderr, flush=True)

    def delete(self, pv: dict[str, Any]) -> None:
        name = pv["metadata"]["name"]
        try:
            self.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(
                volume_id=pv["spec"]["csi"]["volumeHandle"]), timeout=self.timeout)
        except grpc.RpcError as exc:
            print(f"provisioner: DeleteVolume {name}: {exc.code().name} {exc.details()}",
                  file=sys.stderr, flush=True)
            self.api.patch("persistentvolumes", name, {"status": {
                "phase": "Failed", "message": exc.details()}}, subresource="status")
            return
        self.api.delete("persistentvolumes", name)
        print(f"provisioner: deleted {name}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="csi-provisioner (test double)")
    parser.add_argument("--csi-address", required=True)
    parser.add_argument("--node-deployment", default="false")
    parser.add_argument("--extra-create-metadata", action="store_true")
    parser.add_argument("--timeout", default="60s")
    args, _ = parser.parse_known_args(argv)
    if args.node_deployment != "true":
        print("provisioner double: only --node-deployment=true is modelled", file=sys.stderr)
        return 2
    address = args.csi_address
    channel = grpc.insecure_channel(address if address.startswith("unix:")
                                    else f"unix://{address}")
    provisioner = Provisioner(ApiClient.from_kubeconfig(), channel, os.environ["NODE_NAME"],
                              args.extra_create_metadata, float(args.timeout.rstrip("s")))
    provisioner.wait_for_driver()
    while True:
        try:
            provisioner.sync()
        except ApiError as exc:
            print(f"provisioner: API error: {exc}", file=sys.stderr, flush=True)
        time.sleep(0.2)


if __name__ == "__main__":
    sys.exit(main())

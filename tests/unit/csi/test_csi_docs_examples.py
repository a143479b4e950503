"""The three ways to get a volume shown in docs/csi.md are valid Kubernetes objects that the
driver understands (driver name, StorageClass name, volume handle, inline attributes)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml

from cistern.csi.volumes import VolumeRef, parse_volume_id, resolve_volume
from cistern.writecache import CSI_DRIVER_NAME, WriteCacheSpec, storage_class_name

DOC = Path(__file__).resolve().parents[3] / "docs" / "csi.md"


def documents() -> list[dict[str, Any]]:
    blocks = re.findall(r"```yaml\n(.*?)```", DOC.read_text(), re.S)
    return [doc for block in blocks for doc in yaml.safe_load_all(block) if doc]


def test_the_examples_are_valid_kubernetes_objects() -> None:
    docs = documents()
    assert {d["kind"] for d in docs} == {"PersistentVolumeClaim", "PersistentVolume", "Pod"}
    for doc in docs:
        kubernetes_validate.validate(doc, "1.32.0", strict=True)


def test_the_examples_match_what_the_driver_and_operator_use() -> None:
    docs = documents()
    spec = WriteCacheSpec.from_dict({"objectStore": {"bucket": "my-checkpoints"}})
    dynamic = [d for d in docs if d["kind"] == "PersistentVolumeClaim"
               and d["spec"].get("storageClassName")]
    assert [d["spec"]["storageClassName"] for d in dynamic] == [
        storage_class_name("checkpoints", spec)]
    static = [d for d in docs if d["kind"] == "PersistentVolume"]
    assert [d["spec"]["csi"]["driver"] for d in static] == [CSI_DRIVER_NAME]
    assert parse_volume_id(static[0]["spec"]["csi"]["volumeHandle"]) == VolumeRef(
        "ml.checkpoints", "runs/llama-70b")
    inline = [v["csi"] for d in docs if d["kind"] == "Pod" for v in d["spec"]["volumes"]
              if "csi" in v]
    assert [v["driver"] for v in inline] == [CSI_DRIVER_NAME]
    # The kubelet adds the pod's namespace (podInfoOnMount) to an inline volume's attributes.
    pod = next(d for d in docs if d["kind"] == "Pod" and any("csi" in v
                                                               for v in d["spec"]["volumes"]))
    context = {**inline[0]["volumeAttributes"], "csi.storage.k8s.io/ephemeral": "true",
               "csi.storage.k8s.io/pod.namespace": pod["metadata"]["namespace"]}
    assert resolve_volume("csi-made-up-by-kubelet", context) == VolumeRef(
        "ml.checkpoints", "runs/llama-70b")


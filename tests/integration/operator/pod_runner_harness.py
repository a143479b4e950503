"""What the pod-runner end-to-end tests share: the KMock resources the chart needs, the chart
applied through the runner (``Harness``; its fixture ``harness`` reaches this folder's tests
through the conftest), the example WriteCache pointed at moto, the trainer pod, and the
checks on the bucket and on ``kubectl get wc``."""

from __future__ import annotations

import asyncio
import base64
import os
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kmock as kmock_lib
import pytest
import pytest_asyncio
import yaml

from cistern.operator.manifests import LABEL_ROLE
from support.kubelet import ApiClient, Node, helm_template, tool
from support.node import unmount
from support.s3server import TEST_CREDENTIALS, MotoServer
from support.wait import WaitTimeout, async_wait_until

E2E_MARKS = [
    pytest.mark.asyncio,
    pytest.mark.e2e_local,
    pytest.mark.timeout(240),
    pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"),
                       reason="the cache daemon needs root and /dev/fuse to mount"),
    pytest.mark.skipif(shutil.which("cistern-node") is None or shutil.which("cistern-csi")
                       is None, reason="the cistern entry points are not installed"),
]
"""The marks of every pod-runner end-to-end module (``pytestmark = E2E_MARKS``)."""

ROOT = Path(__file__).resolve().parents[3]
NAMESPACE = "ml"
NODE = "node-1"
MANAGED = {"app.kubernetes.io/managed-by": "cistern-operator"}
BUCKET = "e2e-checkpoints"
RESOURCES: dict[str, dict[str, Any]] = {
    "cistern.dev/v1alpha1/writecaches": {"kind": "WriteCache", "namespaced": True,
                                         "subresources": {"status"}, "shortnames": {"wc"}},
    "v1/nodes": {"kind": "Node", "namespaced": False},
    "v1/pods": {"kind": "Pod", "namespaced": True, "subresources": {"status"}},
    "v1/configmaps": {"kind": "ConfigMap", "namespaced": True},
    "v1/secrets": {"kind": "Secret", "namespaced": True},
    "v1/events": {"kind": "Event", "namespaced": True},
    "v1/namespaces": {"kind": "Namespace", "namespaced": False},
    "v1/persistentvolumeclaims": {"kind": "PersistentVolumeClaim", "namespaced": True,
                                  "subresources": {"status"}, "shortnames": {"pvc"}},
    "v1/persistentvolumes": {"kind": "PersistentVolume", "namespaced": False,
                             "subresources": {"status"}, "shortnames": {"pv"}},
    "apps/v1/daemonsets": {"kind": "DaemonSet", "namespaced": True, "subresources": {"status"}},
    "apps/v1/deployments": {"kind": "Deployment", "namespaced": True,
                            "subresources": {"status"}},
    "policy/v1/poddisruptionbudgets": {"kind": "PodDisruptionBudget", "namespaced": True},
    "storage.k8s.io/v1/storageclasses": {"kind": "StorageClass", "namespaced": False},
    "storage.k8s.io/v1/csidrivers": {"kind": "CSIDriver", "namespaced": False},
}
VERBS = {"get", "list", "watch", "create", "patch", "update", "delete"}
RUNS = {"Deployment": "deployments", "DaemonSet": "daemonsets", "CSIDriver": "csidrivers"}

TRAINER = """
import torch, torch.distributed.checkpoint as dcp
torch.manual_seed(12)
state = {"model": {"w": torch.randn(256, 256), "b": torch.randn(256)}, "step": torch.tensor(1)}
dcp.save(state, storage_writer=dcp.FileSystemWriter("/checkpoints/step-1", sync_files=True))
print("saved", flush=True)
"""


async def until(predicate: Callable[[], Any], timeout: float, what: str,
                describe: Callable[[], str] | None = None) -> Any:
    """``async_wait_until`` for a blocking predicate (run in a thread: KMock is served by this
    loop); a timeout also shows ``describe()`` (the pods, their containers' last lines)."""
    try:
        return await async_wait_until(lambda: asyncio.to_thread(predicate), timeout, what)
    except WaitTimeout as exc:
        detail = await asyncio.to_thread(describe) if describe else ""
        raise WaitTimeout(f"{exc}\n{detail}") from None


@dataclass
class Harness:
    api: ApiClient
    node: Node
    chart: list[dict[str, Any]]
    s3: MotoServer
    root: Path

    def describe(self) -> str:
        wcs = self.api.list("writecaches")
        return (self.node.describe() + "\nwritecaches: "
                + yaml.safe_dump([w.get("status") for w in wcs])[:3000])

    def cache_daemon(self) -> Any:
        pods = self.node.pods_with({**MANAGED, LABEL_ROLE: "cache-node"})
        return pods[0] if len(pods) == 1 else None

    def kubectl(self, *args: str) -> str:
        result = subprocess.run([str(tool("kubectl")), *args], capture_output=True, text=True,
                                timeout=30, env={**os.environ,
                                                 "KUBECONFIG": str(self.node.kubeconfig)})
        assert result.returncode == 0, f"kubectl {' '.join(args)}: {result.stderr}"
        return result.stdout


def apply_chart(api: ApiClient, docs: list[dict[str, Any]]) -> None:
    for doc in docs:
        if doc["kind"] in RUNS:
            api.create(RUNS[doc["kind"]], doc, doc["metadata"].get("namespace"))


def serve_resources(kmock: Any) -> None:
    """Make KMock serve every kind the chart, the operator and the runner's doubles use."""
    for key, info in RESOURCES.items():
        kmock.resources[key] = kmock_lib.ResourceInfo(verbs=VERBS, **info)


def unmount_below(*roots: Path) -> None:
    """Detach what the runner left mounted under ``roots`` (caches, published volumes)."""
    for line in Path("/proc/self/mounts").read_text().splitlines():
        mountpoint = line.split()[1]
        if any(mountpoint.startswith(str(root)) for root in roots):
            unmount(mountpoint)


@pytest_asyncio.fixture()
async def harness(kmock: Any, tmp_path: Path, request: pytest.FixtureRequest
                  ) -> AsyncIterator[Harness]:
    """KMock, the chart rendered (with ``request.param``'s extra values) and one node whose
    kubelet directory is the chart's ``kubeletDir``."""
    serve_resources(kmock)
    values: dict[str, Any] = {"operator": {"statusInterval": 1, "logFormat": "plain"},
                              **getattr(request, "param", {})}
    chart = await asyncio.to_thread(helm_template, values, tmp_path)
    api = ApiClient(str(kmock.url))
    # Short: unix socket paths under it must stay within 107 characters.
    root = Path(tempfile.mkdtemp(prefix="pod-runner-", dir="/tmp"))
    node = Node(api, NODE, root, time_scale=0.1,
                kubelet_dir=values.get("kubeletDir", "/var/lib/kubelet"))
    with MotoServer() as s3:
        await asyncio.to_thread(s3.client().create_bucket, Bucket=BUCKET)
        await asyncio.to_thread(node.start)
        try:
            yield Harness(api, node, chart, s3, root)
        finally:
            await asyncio.to_thread(node.stop)
            unmount_below(root)
            shutil.rmtree(root, ignore_errors=True)


def example_writecache(endpoint: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """crds/examples/writecache-minimal.yaml pointed at moto, and the Secret it names."""
    wc = yaml.safe_load((ROOT / "crds" / "examples" / "writecache-minimal.yaml").read_text())
    wc["metadata"]["namespace"] = NAMESPACE
    store = wc["spec"]["objectStore"]
    store.update({"bucket": BUCKET, "endpoint": endpoint, "pathStyle": True})
    # Dirty data stays on the node until the drain, so kill -9 and the drain guard have
    # something to keep.
    # The drain is rate-limited so the operator sees it under way (the guard still held).
    wc["spec"]["flush"] = {"uploadDelay": "1h", "evacuationBytesPerSecond": "1Mi"}
    secret = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
              "metadata": {"name": store["credentialsSecretRef"]["name"],
                           "namespace": NAMESPACE},
              "data": {k: base64.b64encode(TEST_CREDENTIALS[k].encode()).decode()
                       for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}}
    return wc, secret


def trainer_pod(claim: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """crds/examples/pvc-and-pod.yaml with a torch.distributed.checkpoint save."""
    pvc, pod = yaml.safe_load_all((ROOT / "crds" / "examples" / "pvc-and-pod.yaml").read_text())
    for obj in (pvc, pod):
        obj["metadata"]["namespace"] = NAMESPACE
    pvc["metadata"]["name"] = claim
    pod["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] = claim
    pod["spec"]["containers"][0]["command"] = ["python3", "-c"]
    pod["spec"]["containers"][0]["args"] = [TRAINER]
    return pvc, pod


def printer_columns() -> str:
    crd = yaml.safe_load((ROOT / "crds" / "writecaches.cistern.dev.yaml").read_text())
    columns = crd["spec"]["versions"][0]["additionalPrinterColumns"]
    return "NAME:.metadata.name," + ",".join(
        f"{c['name'].upper()}:{c['jsonPath']}" for c in columns if not c.get("priority"))


def bucket_keys(h: Harness, part: str) -> dict[str, int]:
    listing = h.s3.client().list_objects_v2(Bucket=BUCKET)
    return {o["Key"]: o["Size"] for o in listing.get("Contents", []) if part in o["Key"]}


def wc_columns(h: Harness, name: str, expected: tuple[str, str, str]
               ) -> dict[str, str] | None:
    """``kubectl get wc`` with the CRD's printer columns; the row when it shows ``expected``
    as READY, NODES, DIRTY."""
    table = h.kubectl("get", "wc", name, "-n", NAMESPACE,
                      "-o", f"custom-columns={printer_columns()}")
    header, row = table.splitlines()[:2]
    columns = dict(zip(header.split(), row.split(), strict=False))
    return columns if (columns["READY"], columns["NODES"], columns["DIRTY"]) == expected \
        else None


def write_synced(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as file:
        file.write(data)
        os.fsync(file.fileno())

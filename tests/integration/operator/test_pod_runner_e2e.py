"""End to end on one machine, no container engine (issue 12). Marked ``e2e_local``.

``helm template`` the chart -> the pod runner (tests/support/kubelet) runs the operator's
Deployment against KMock -> the example WriteCache (pointed at moto) and its Secret -> the
operator writes ConfigMap, token Secret and DaemonSet -> the runner starts the cache daemon
from that DaemonSet exactly as written, and the chart's CSI node plugin with doubles of its
sidecars -> a PVC of the operator's StorageClass is provisioned by the provisioner double ->
the kubelet double publishes it for a trainer pod whose real torch.distributed.checkpoint save
writes through it -> the daemon is killed and restarted from the same spec, dirty data intact
-> a cordon: the drain guard holds until dirty = 0 -> the objects are in the bucket and
``kubectl get wc`` (the CRD's printer columns) shows Ready, 1/1, 0 dirty -> the PVC goes
(Delete policy: the objects too) -> the WriteCache goes: the finalizer completes.

Objects are found by the operator's labels in any namespace and paths are read from the
rendered objects, so a change of names, namespaces or mount layout keeps the test valid.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import urllib.request
import warnings
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kmock as kmock_lib
import pytest
import pytest_asyncio
import yaml

from cistern.operator.manifests import LABEL_ROLE
from cistern.writecache import cache_key
from support.kubelet import ApiClient, Node, helm_template, tool
from support.node import is_mounted, unmount
from support.s3server import TEST_CREDENTIALS, MotoServer
from support.wait import WaitTimeout, async_wait_until

pytestmark = [
    pytest.mark.asyncio,
    pytest.mark.e2e_local,
    pytest.mark.timeout(240),
    pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"),
                       reason="the cache daemon needs root and /dev/fuse to mount"),
    pytest.mark.skipif(shutil.which("cistern-node") is None or shutil.which("cistern-csi")
                       is None, reason="the cistern entry points are not installed"),
]

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


@pytest_asyncio.fixture()
async def harness(kmock: Any, tmp_path: Path, request: pytest.FixtureRequest
                  ) -> AsyncIterator[Harness]:
    """KMock, the chart rendered (with ``request.param``'s extra values) and one node whose
    kubelet directory is the chart's ``kubeletDir``."""
    for key, info in RESOURCES.items():
        kmock.resources[key] = kmock_lib.ResourceInfo(verbs=VERBS, **info)
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
            for line in Path("/proc/self/mounts").read_text().splitlines():
                mountpoint = line.split()[1]
                if mountpoint.startswith(str(root)):
                    unmount(mountpoint)
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


async def test_chart_operator_daemon_csi_and_a_checkpoint(harness: Harness) -> None:
    h = harness
    api = h.api
    await asyncio.to_thread(apply_chart, api, h.chart)
    # The chart's pods come up: the operator, and the CSI node plugin with its sidecars.
    for doc in h.chart:
        if doc["kind"] in ("Deployment", "DaemonSet"):
            labels = doc["spec"]["selector"]["matchLabels"]
            await until(lambda labels=labels: [p for p in h.node.pods_with(labels) if p.ready],
                        30, f"{doc['kind']} {doc['metadata']['name']} ready", h.describe)

    wc, secret = example_writecache(h.s3.endpoint)
    await asyncio.to_thread(api.create, "secrets", secret, NAMESPACE)
    await asyncio.to_thread(api.create, "writecaches", wc, NAMESPACE)
    name = wc["metadata"]["name"]

    # The operator's DaemonSet, wherever it puts it, runs the cache daemon exactly as written.
    daemon = await until(h.cache_daemon, 60, "the cache daemon pod", h.describe)
    await until(lambda: daemon.ready, 60, "the cache daemon ready", h.describe)
    argv = next(iter(daemon.containers.values())).plan.argv
    config = Path(argv[argv.index("--config") + 1])  # as the runner translated it
    mount = Path(yaml.safe_load(config.read_text())["mount"])
    assert mount.is_relative_to(h.root) and is_mounted(mount), mount
    storage_class = await until(lambda: ((api.get("writecaches", name, NAMESPACE) or {}).get(
        "status") or {}).get("storageClassName"), 30, "the StorageClass in status", h.describe)
    assert await asyncio.to_thread(api.get, "storageclasses", storage_class)

    # A PVC of the operator's StorageClass and a trainer pod writing a DCP checkpoint.
    pvc, pod = trainer_pod("checkpoints")
    pvc["spec"]["storageClassName"] = storage_class
    await asyncio.to_thread(api.create, "persistentvolumeclaims", pvc, NAMESPACE)
    await asyncio.to_thread(api.create, "pods", pod, NAMESPACE)
    done = await until(lambda: ((api.get("pods", "trainer", NAMESPACE) or {}).get(
        "status") or {}).get("phase") in ("Succeeded", "Failed"), 90, "the trainer pod",
        h.describe)
    trainer = await asyncio.to_thread(api.get, "pods", "trainer", NAMESPACE)
    assert done and trainer["status"]["phase"] == "Succeeded", h.describe()
    published = [p for (uid, _), p in h.node.csi.published.items()
                 if uid == trainer["metadata"]["uid"]]
    assert len(published) == 1 and is_mounted(published[0].target), published

    # The daemon holds the checkpoint dirty (uploadDelay 1h); kill -9 it: the runner restarts
    # it from the same spec, and its recovery uploads what the journal kept.
    def node_status() -> dict[str, Any]:
        wc_now = api.get("writecaches", name, NAMESPACE) or {}
        nodes = (wc_now.get("status") or {}).get("nodes") or [{}]
        return dict(nodes[0])

    written = {f.relative_to(mount): f.stat().st_size for f in await asyncio.to_thread(
        lambda: list(mount.rglob("step-1/*")))}
    dirty = sum(written.values())
    assert dirty > 256 * 256 * 4 and any(f.name == ".metadata" for f in written), written
    await until(lambda: node_status().get("dirtyBytes") == dirty, 30,
                "the checkpoint's dirty bytes in status", h.describe)
    cache = next(iter(daemon.containers.values()))
    killed = cache.kill()
    assert killed is not None
    await until(lambda: cache.state.restarts == 1 and cache.state.ready
                and cache.pid != killed and is_mounted(mount), 60,
                "the daemon restarted, mounted and ready", h.describe)
    # Every file (the commit marker last); the sizes are the ones the trainer wrote.
    step1 = await until(lambda: (keys := bucket_keys(h, "/step-1/")) and any(
        k.endswith("/step-1/.metadata") for k in keys) and keys, 30, "step-1 in the bucket")
    assert sorted(step1.values()) == sorted(written.values()), (step1, written)
    await asyncio.to_thread(verify_checkpoint, h, list(step1))
    await until(lambda: node_status().get("dirtyBytes") == 0, 30, "dirty 0", h.describe)
    columns = await until(lambda: wc_columns(h, name, ("True", "1/1", "0")), 30,
                          "kubectl get wc: Ready, 1/1, 0 dirty", h.describe)

    # New dirty data through the restarted daemon's mount; cordon: the drain guard holds the
    # node until the daemon has flushed it all.
    volume_dir = next(p for p in mount.rglob("step-1")).parent
    payload = os.urandom(6 * 2**20)
    await asyncio.to_thread(write_synced, volume_dir / "step-2" / "shard-0.bin", payload)
    await until(lambda: node_status().get("dirtyBytes") == len(payload), 30,
                "the new dirty bytes in status", h.describe)
    guard_labels = {**MANAGED, LABEL_ROLE: "drain-guard"}
    assert await asyncio.to_thread(api.list, "poddisruptionbudgets", None, guard_labels)
    await asyncio.to_thread(api.patch, "nodes", NODE, {"spec": {"unschedulable": True}})
    # A few seconds at 1 MiB/s: the operator sees the drain under way, and the guard held.
    held = await until(lambda: (n := node_status()).get("drainStartedAt") and n.get(
        "dirtyBytes") and api.list("poddisruptionbudgets", labels=guard_labels), 30,
        "the drain under way with dirty bytes left", h.describe)
    assert held
    await until(lambda: not api.list("poddisruptionbudgets", labels=guard_labels), 60,
                "the drain guard released", h.describe)
    step2 = await asyncio.to_thread(bucket_keys, h, "/step-2/")
    assert list(step2.values()) == [len(payload)], step2
    await until(lambda: node_status().get("drainOutcome") == "Drained"
                and node_status().get("dirtyBytes") == 0, 30, "the drain outcome", h.describe)
    assert columns

    # Uncordon; the trainer pod goes (unpublished), then its PVC (Delete policy): the
    # provisioner's DeleteVolume removes the directory through the cache, objects included.
    await asyncio.to_thread(api.patch, "nodes", NODE, {"spec": {"unschedulable": False}})
    await until(lambda: node_status().get("phase") == "Running", 30, "resumed", h.describe)
    await asyncio.to_thread(api.delete, "pods", "trainer", NAMESPACE)
    await until(lambda: not is_mounted(published[0].target), 30, "the volume unpublished",
                h.describe)
    pv_name = (await asyncio.to_thread(api.get, "persistentvolumeclaims", "checkpoints",
                                       NAMESPACE))["spec"]["volumeName"]
    await asyncio.to_thread(api.delete, "persistentvolumeclaims", "checkpoints", NAMESPACE)
    await until(lambda: api.get("persistentvolumes", pv_name) is None, 30,
                "the PV deleted by the provisioner", h.describe)
    assert not volume_dir.exists()
    await until(lambda: not bucket_keys(h, f"/{volume_dir.name}/"), 30,
                "the volume's objects deleted from the bucket", h.describe)

    # The WriteCache goes: its finalizer completes, and the runner stops its daemon.
    await asyncio.to_thread(api.delete, "writecaches", name, NAMESPACE)
    await until(lambda: api.get("writecaches", name, NAMESPACE) is None, 60,
                "the WriteCache's finalizer", h.describe)
    await until(lambda: h.cache_daemon() is None and not is_mounted(mount), 60,
                "the cache daemon gone and unmounted", h.describe)
    assert await asyncio.to_thread(api.get, "storageclasses", storage_class) is None


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


def verify_checkpoint(h: Harness, keys: list[str]) -> None:
    """The bucket's copy loads with torch.distributed.checkpoint into the trainer's tensors."""
    import torch
    import torch.distributed.checkpoint as dcp

    local = Path(tempfile.mkdtemp(prefix="dcp-", dir=h.root))
    client = h.s3.client()
    for key in keys:
        body = client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        (local / key.rsplit("/", 1)[1]).write_bytes(body)
    torch.manual_seed(12)
    expected = {"model": {"w": torch.randn(256, 256), "b": torch.randn(256)},
                "step": torch.tensor(1)}
    loaded = {"model": {"w": torch.zeros(256, 256), "b": torch.zeros(256)},
              "step": torch.tensor(0)}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        dcp.load(loaded, storage_reader=dcp.FileSystemReader(str(local)))
    assert torch.equal(loaded["model"]["w"], expected["model"]["w"])
    assert torch.equal(loaded["model"]["b"], expected["model"]["b"])
    assert int(loaded["step"]) == 1


# ------------------------------------------------------------------ broken manifests


def pod_problem(h: Harness, labels: dict[str, str]) -> str:
    """What the API shows for a pod that does not run: its reason and message, or the
    last termination of a crash-looping container."""
    for pod in h.api.list("pods", labels=labels):
        status = pod.get("status") or {}
        if status.get("reason"):
            return f"{status['reason']}: {status.get('message')}"
        for container in status.get("containerStatuses") or []:
            last = (container.get("lastState") or {}).get("terminated")
            if container.get("restartCount") and last:
                return f"{container['name']} restarted {container['restartCount']}x, " \
                       f"exit {last['exitCode']}: {last['message']}"
    return ""


async def test_chart_without_the_mount_root_volume_names_it(harness: Harness) -> None:
    h = harness
    csi = next(d for d in h.chart if d["kind"] == "DaemonSet")
    pod_spec = csi["spec"]["template"]["spec"]
    mount_root = next(m for c in pod_spec["containers"] for m in c.get("volumeMounts") or []
                      if m.get("mountPropagation") == "HostToContainer")
    pod_spec["volumes"] = [v for v in pod_spec["volumes"] if v["name"] != mount_root["name"]]
    await asyncio.to_thread(apply_chart, h.api, [csi])
    labels = csi["spec"]["selector"]["matchLabels"]
    problem = await until(lambda: pod_problem(h, labels), 30, "the pod's problem", h.describe)
    assert problem.startswith("CreateContainerConfigError"), problem
    assert f"volumeMount {mount_root['name']!r} names no volume" in problem, problem


def _secret_refs(spec: dict[str, Any]) -> set[str]:
    """Names of the Secrets a pod spec reads (volumes and env)."""
    names = {v["secret"]["secretName"] for v in spec.get("volumes") or [] if "secret" in v}
    for container in spec.get("containers") or []:
        for env in container.get("env") or []:
            ref = (env.get("valueFrom") or {}).get("secretKeyRef")
            if ref:
                names.add(ref["name"])
    return names


# Only the operator runs here (no CSI node plugin, so no FUSE holder: a daemon told to hand
# its connection to a holder waits for one).
@pytest.mark.parametrize("harness", [{"holder": {"enabled": False}}], indirect=True)
async def test_misspelled_config_key_and_missing_secret_are_named(harness: Harness) -> None:
    h = harness
    api = h.api
    await asyncio.to_thread(apply_chart, api, [d for d in h.chart if d["kind"] == "Deployment"])
    wc, secret = example_writecache(h.s3.endpoint)
    await asyncio.to_thread(api.create, "secrets", secret, NAMESPACE)
    await asyncio.to_thread(api.create, "writecaches", wc, NAMESPACE)
    daemon = await until(h.cache_daemon, 60, "the cache daemon pod", h.describe)
    await until(lambda: daemon.ready, 60, "the cache daemon ready", h.describe)
    labels = {**MANAGED, LABEL_ROLE: "cache-node"}
    (namespace, pod_name) = daemon.key

    # A misspelled key in the node config the daemon reads: a crash loop naming the key.
    config_volume = next(v for v in daemon.ctx.spec["volumes"] if "configMap" in v)
    cm_name = config_volume["configMap"]["name"]
    cm = await asyncio.to_thread(api.get, "configmaps", cm_name, namespace)
    key, text = next(iter(cm["data"].items()))
    assert "\nmount: " in "\n" + text
    broken = ("\n" + text).replace("\nmount: ", "\nmountt: ")[1:]
    await asyncio.to_thread(api.patch, "configmaps", cm_name, {"data": {key: broken}}, namespace)
    await asyncio.to_thread(api.delete, "pods", pod_name, namespace)
    problem = await until(lambda: pod_problem(h, labels), 60, "the crash loop", h.describe)
    assert "mountt" in problem, problem
    await asyncio.to_thread(api.patch, "configmaps", cm_name, {"data": {key: text}}, namespace)

    # The credentials Secret gone: the daemon pod cannot be created, and says which Secret.
    await asyncio.to_thread(api.delete, "secrets", secret["metadata"]["name"], NAMESPACE)
    copies = {ref for ref in _secret_refs(daemon.ctx.spec) if "credentials" in ref}
    await until(lambda: all(api.get("secrets", name, namespace) is None for name in copies),
                150, "the operator removing its copy of the Secret", h.describe)
    await asyncio.to_thread(api.delete, "pods", pod_name, namespace)
    problem = await until(lambda: "CreateContainerConfigError" in pod_problem(h, labels)
                          and pod_problem(h, labels), 60, "the missing Secret", h.describe)
    # The daemon reads the operator's copy in its own namespace (docs/security.md), which the
    # operator removes with its source: the pod names the copy it cannot find.
    assert copies and any(f"secret {name!r} not found" in problem for name in copies), (
        copies, problem)


@pytest.mark.parametrize("harness", [{"kubeletDir": "/var/lib/k0s/kubelet",
                                      "mountRoot": "/mnt/cistern/mounts"}], indirect=True)
async def test_chart_kubelet_dir_and_mount_root_reach_every_process(harness: Harness) -> None:
    """Moved kubelet and mount directories: the plugin registers where that kubelet looks, and
    finds the cache the operator's daemon mounts (its Probe turns ready)."""
    h = harness
    await asyncio.to_thread(apply_chart, h.api, h.chart)
    registration = await until(lambda: h.node.csi.registered("csi.cistern.dev"), 30,
                               "the plugin registered with the kubelet", h.describe)
    assert registration["endpoint"].startswith("/var/lib/k0s/kubelet/plugins/"), registration
    wc, secret = example_writecache(h.s3.endpoint)
    await asyncio.to_thread(h.api.create, "secrets", secret, NAMESPACE)
    await asyncio.to_thread(h.api.create, "writecaches", wc, NAMESPACE)
    daemon = await until(h.cache_daemon, 60, "the cache daemon pod", h.describe)
    await until(lambda: daemon.ready, 60, "the cache daemon ready", h.describe)
    mounts = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
    key = cache_key(wc["metadata"]["namespace"], wc["metadata"]["name"])
    assert str(h.root / "host" / "mnt/cistern/mounts" / key) in mounts, key
    await until(lambda: h.node.csi.probe("csi.cistern.dev"), 30, "the CSI Probe ready",
                h.describe)


# ------------------------------------------------------------------ rolling update (issue 14)

WRITER = """
import hashlib, os, time
os.makedirs("/checkpoints/w", exist_ok=True)
i, worst = 0, 0.0
while not os.path.exists("/checkpoints/stop"):
    started = time.monotonic()
    with open(f"/checkpoints/w/ckpt-{i}.bin", "wb") as f:
        f.write(hashlib.sha256(str(i).encode()).digest() * 4096)
        os.fsync(f.fileno())
    worst = max(worst, time.monotonic() - started)
    i += 1
print(f"files {i} worst-pause {worst:.3f}", flush=True)
"""


def daemon_status(pod: Any) -> dict[str, Any]:
    """The cache daemon's own ``GET /status`` on its pod IP (read-only: no token)."""
    port = next(p["containerPort"] for c in pod.ctx.spec["containers"]
                for p in c.get("ports") or [] if p["name"] == "control")
    with urllib.request.urlopen(f"http://{pod.ctx.pod_ip}:{port}/status", timeout=5) as reply:
        return dict(json.load(reply))


async def test_cache_daemonset_update_pauses_a_writing_pod(harness: Harness) -> None:
    """The chart's default FUSE holder (docs/restarts.md): the cache DaemonSet's pod template
    changes (``kubectl rollout restart``) while a pod writes and fsyncs files through its
    published volume; the runner replaces the daemon pod (SIGTERM, a new pod from the new
    template) as the RollingUpdate would. The writer sees no error; every file reaches S3."""
    h = harness
    api = h.api
    csi = [d for d in h.chart if d["kind"] == "DaemonSet"]
    await asyncio.to_thread(apply_chart, api, [d for d in h.chart if d not in csi])
    wc, secret = example_writecache(h.s3.endpoint)
    wc["spec"]["flush"] = {"uploadDelay": "1s"}
    await asyncio.to_thread(api.create, "secrets", secret, NAMESPACE)
    await asyncio.to_thread(api.create, "writecaches", wc, NAMESPACE)
    name = wc["metadata"]["name"]
    # The node plugin reads the access policies when its pod starts (the runner does not
    # refresh ConfigMap volumes): start it once the operator wrote them. The cache daemon
    # waits for its holder (in the node plugin pod) meanwhile.
    await until(lambda: any(
        c["metadata"]["name"] == "cistern-access" and c.get("data")
        for c in api.list("configmaps")), 60, "the access policies", h.describe)
    await asyncio.to_thread(apply_chart, api, csi)
    old = await until(h.cache_daemon, 60, "the cache daemon pod", h.describe)
    await until(lambda: old.ready and daemon_status(old)["fuse"]["held"], 60,
                "the cache daemon ready, its connection held", h.describe)
    storage_class = await until(lambda: ((api.get("writecaches", name, NAMESPACE) or {}).get(
        "status") or {}).get("storageClassName"), 30, "the StorageClass in status", h.describe)

    pvc, pod = trainer_pod("checkpoints")
    pvc["spec"]["storageClassName"] = storage_class
    pod["spec"]["containers"][0]["args"] = [WRITER]
    await asyncio.to_thread(api.create, "persistentvolumeclaims", pvc, NAMESPACE)
    await asyncio.to_thread(api.create, "pods", pod, NAMESPACE)
    target = await until(lambda: next((p.target for p in h.node.csi.published.values()
                                       if p.target.exists()), None), 60,
                         "the writer's volume published", h.describe)
    await until(lambda: len(list((target / "w").glob("ckpt-*"))) >= 5, 30,
                "the writer under way", h.describe)

    # The rollout: a changed pod template (what `kubectl rollout restart` or a new image does).
    ds = next(d for d in await asyncio.to_thread(api.list, "daemonsets")
              if d["metadata"]["name"] == old.ctx.pod["metadata"].get("labels", {}).get(
                  "pod-runner/owner", "").split(".", 1)[-1])
    await asyncio.to_thread(api.patch, "daemonsets", ds["metadata"]["name"], {"spec": {
        "template": {"metadata": {"annotations": {
            "kubectl.kubernetes.io/restartedAt": "2025-01-01T00:00:00Z"}}}}},
        ds["metadata"]["namespace"])
    new = await until(lambda: (d := h.cache_daemon()) is not None and d is not old
                      and d.ready and d, 60, "the new cache daemon pod ready", h.describe)
    fuse = await until(lambda: (f := daemon_status(new)["fuse"]).get("takeovers") and f, 30,
                       "the new daemon took the connection over", h.describe)
    assert fuse["takeovers"] == 1 and fuse["held"], fuse
    before = len(list((target / "w").glob("ckpt-*")))
    await until(lambda: len(list((target / "w").glob("ckpt-*"))) >= before + 5, 30,
                "the writer going on through the new daemon", h.describe)
    await asyncio.to_thread((target / "stop").write_bytes, b"")
    await until(lambda: ((api.get("pods", "trainer", NAMESPACE) or {}).get("status") or {}).get(
        "phase") in ("Succeeded", "Failed"), 60, "the writer pod done", h.describe)
    writer = await asyncio.to_thread(api.get, "pods", "trainer", NAMESPACE)
    running = h.node.pod(NAMESPACE, "trainer")
    log = running.container("trainer").tail(20) if running else ""
    assert writer["status"]["phase"] == "Succeeded", f"{log}\n{h.describe()}"
    result = next(line for line in reversed(log.splitlines()) if line.startswith("files "))
    count = int(result.split()[1])
    print(result)  # worst-pause: the longest write+fsync the writer saw

    expected = {f"ckpt-{i}.bin": hashlib.sha256(str(i).encode()).digest() * 4096
                for i in range(count)}
    keys = await until(lambda: (k := bucket_keys(h, "/w/ckpt-")) and len(k) == count and k,
                       60, f"{count} files in the bucket", h.describe)
    client = h.s3.client()
    for key in keys:
        body = await asyncio.to_thread(lambda key=key: client.get_object(
            Bucket=BUCKET, Key=key)["Body"].read())
        assert body == expected[key.rsplit("/", 1)[1]], key

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
import hashlib
import json
import os
import tempfile
import urllib.request
import warnings
from pathlib import Path
from typing import Any

import yaml

from cistern.operator.manifests import LABEL_ROLE
from support.node import is_mounted

from .pod_runner_harness import (
    BUCKET,
    E2E_MARKS,
    MANAGED,
    NAMESPACE,
    NODE,
    Harness,
    apply_chart,
    bucket_keys,
    example_writecache,
    trainer_pod,
    until,
    wc_columns,
    write_synced,
)

pytestmark = E2E_MARKS


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

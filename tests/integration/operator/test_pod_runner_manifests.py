"""Chart values that break or move things, through the pod runner (marked ``e2e_local``): a
missing volume, a misspelled config key and a missing Secret are named where an operator
looks; moved kubelet and mount directories reach every process."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from cistern.operator.manifests import LABEL_ROLE
from cistern.writecache import cache_key

from .pod_runner_harness import (
    E2E_MARKS,
    MANAGED,
    NAMESPACE,
    Harness,
    apply_chart,
    example_writecache,
    until,
)

pytestmark = E2E_MARKS


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

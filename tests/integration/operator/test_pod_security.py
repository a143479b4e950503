"""Pod Security Standards per namespace (issue 13): the policy check of the chart.

Tenants' namespaces may enforce ``restricted``: everything Cistern creates there (the drain
guards) must pass it. In the release namespace only the node plugins are privileged: the CSI
node plugin (chart) and the cache daemons (rendered by the operator); the operator and the
central CSI controller pass ``restricted`` too. The checker implements the Pod Security
Standards' baseline and restricted rules (Kubernetes 1.32) on pod specs; docs/security.md says
how to label the namespaces.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from cistern.operator import manifests
from cistern.operator.settings import OperatorSettings
from cistern.writecache import WriteCacheSpec

from .test_helm_chart import NON_DEFAULT_VALUES, render
from .test_helm_chart import helm as helm  # noqa: F401 - the fixture

BASELINE_CAPABILITIES = {"AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL",
                         "MKNOD", "NET_BIND_SERVICE", "SETFCAP", "SETGID", "SETPCAP", "SETUID",
                         "SYS_CHROOT"}
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
                      "persistentVolumeClaim", "projected", "secret"}


def _containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod.get("initContainers", []), *pod.get("containers", []),
            *pod.get("ephemeralContainers", [])]


def baseline_violations(pod: dict[str, Any]) -> list[str]:
    out = [f"host namespace {k}" for k in ("hostNetwork", "hostPID", "hostIPC") if pod.get(k)]
    out += [f"volume {v['name']}: hostPath" for v in pod.get("volumes", []) if "hostPath" in v]
    pod_ctx = pod.get("securityContext") or {}
    if (pod_ctx.get("seccompProfile") or {}).get("type") == "Unconfined":
        out.append("pod seccomp Unconfined")
    for c in _containers(pod):
        ctx = c.get("securityContext") or {}
        if ctx.get("privileged"):
            out.append(f"{c['name']}: privileged")
        added = set((ctx.get("capabilities") or {}).get("add") or []) - BASELINE_CAPABILITIES
        if added:
            out.append(f"{c['name']}: capabilities {sorted(added)}")
        if any(p.get("hostPort") for p in c.get("ports", [])):
            out.append(f"{c['name']}: hostPort")
        if ctx.get("procMount", "Default") != "Default":
            out.append(f"{c['name']}: procMount")
        if (ctx.get("seccompProfile") or {}).get("type") == "Unconfined":
            out.append(f"{c['name']}: seccomp Unconfined")
    return out


def restricted_violations(pod: dict[str, Any]) -> list[str]:
    out = baseline_violations(pod)
    for volume in pod.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            out.append(f"volume {volume['name']}: {sorted(kinds)}")
    pod_ctx = pod.get("securityContext") or {}
    for c in _containers(pod):
        ctx = c.get("securityContext") or {}
        if ctx.get("allowPrivilegeEscalation") is not False:
            out.append(f"{c['name']}: allowPrivilegeEscalation not false")
        if not ctx.get("runAsNonRoot", pod_ctx.get("runAsNonRoot")):
            out.append(f"{c['name']}: runAsNonRoot not true")
        if ctx.get("runAsUser", pod_ctx.get("runAsUser")) == 0:
            out.append(f"{c['name']}: runAsUser 0")
        seccomp = (ctx.get("seccompProfile") or pod_ctx.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            out.append(f"{c['name']}: seccompProfile {seccomp}")
        caps = ctx.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            out.append(f"{c['name']}: capabilities not dropped")
        if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            out.append(f"{c['name']}: adds capabilities")
    return out


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    return obj["spec"] if obj["kind"] == "Pod" else obj["spec"]["template"]["spec"]


def workloads(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    kinds = {"Pod", "Deployment", "DaemonSet", "StatefulSet", "Job", "ReplicaSet"}
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in docs if d["kind"] in kinds}


def test_the_checker_catches_what_it_must() -> None:
    """A check that cannot fail is a defect: each rule refuses its violation."""
    good = {"securityContext": {"runAsNonRoot": True, "seccompProfile": {
        "type": "RuntimeDefault"}}, "containers": [{"name": "c", "securityContext": {
            "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}}],
        "volumes": [{"name": "v", "emptyDir": {}}]}
    assert restricted_violations(good) == []
    bad_cases = [
        {**good, "hostNetwork": True},
        {**good, "volumes": [{"name": "h", "hostPath": {"path": "/"}}]},
        {**good, "securityContext": {"runAsNonRoot": True}},
        {**good, "containers": [{"name": "c", "securityContext": {"privileged": True}}]},
        {**good, "containers": [{"name": "c", "securityContext": {
            "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"],
                                                                  "add": ["SYS_ADMIN"]}}}]},
        {**good, "containers": [{"name": "c", "securityContext": {
            "allowPrivilegeEscalation": False, "runAsUser": 0,
            "capabilities": {"drop": ["ALL"]}}}]},
    ]
    for bad in bad_cases:
        assert restricted_violations(bad), bad


@pytest.mark.parametrize("values", [None, NON_DEFAULT_VALUES], ids=["default", "custom"])
def test_chart_pods_are_restricted_but_the_node_plugin(helm: Path, tmp_path: Path,
                                                       values: dict[str, Any] | None) -> None:
    found = workloads(render(helm, tmp_path, values))
    privileged = {name for name, obj in found.items() if restricted_violations(pod_spec(obj))}
    assert privileged == {"DaemonSet/cistern-csi-node"}, {
        name: restricted_violations(pod_spec(found[name])) for name in privileged}
    # The node plugin is privileged on purpose (mount propagation, /dev/fuse binds).
    assert baseline_violations(pod_spec(found["DaemonSet/cistern-csi-node"]))


BODY: dict[str, Any] = {
    "apiVersion": "cistern.dev/v1alpha1", "kind": "WriteCache",
    "metadata": {"name": "ckpt", "namespace": "team-a", "uid": "0c0ffee0-0000-0000-0000-1"},
    "spec": {"objectStore": {"bucket": "ckpt-bucket", "credentialsSecretRef": {"name": "c"}}},
}


def test_operator_objects_restricted_in_tenant_namespaces() -> None:
    """Everything the operator puts in a tenant's namespace passes ``restricted``; the one
    privileged object (the cache DaemonSet) goes to the release namespace."""
    settings = OperatorSettings(workload_namespace="cistern-system")
    spec = WriteCacheSpec.from_dict(BODY["spec"])
    config = manifests.node_config("ckpt", "team-a", spec, settings)
    objects = [manifests.daemonset(BODY, spec, config, settings),
               manifests.guard_pod(BODY, "node-a", settings),
               manifests.guard_pdb(BODY, "node-a"),
               manifests.configmap(BODY, config, settings),
               manifests.control_secret(BODY, "t", settings)]
    for obj in objects:
        in_tenant = obj["metadata"]["namespace"] == "team-a"
        if obj["kind"] in ("Pod", "DaemonSet") and in_tenant:
            assert restricted_violations(pod_spec(obj)) == [], obj["metadata"]["name"]
        if obj["kind"] == "DaemonSet":
            assert not in_tenant and restricted_violations(pod_spec(obj))
        if obj["kind"] in ("ConfigMap", "Secret"):
            assert not in_tenant

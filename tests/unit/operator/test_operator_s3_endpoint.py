"""What the operator renders for ``spec.s3Endpoint``: node config, DaemonSet port and key mount,
the node-local Service, the Secret copy and the status URL; and the specs it refuses."""

from __future__ import annotations

import copy
from typing import Any

import kubernetes_validate
import pytest
import yaml

from cistern.config import ConfigError, NodeConfig
from cistern.operator import manifests, s3endpoint
from cistern.operator.settings import OperatorSettings
from cistern.writecache import WriteCacheSpec

BODY: dict[str, Any] = {
    "apiVersion": "cistern.dev/v1alpha1", "kind": "WriteCache",
    "metadata": {"name": "ckpt", "namespace": "ml", "uid": "0c0ffee0-0000-0000-0000-000000000001"},
    "spec": {"objectStore": {"bucket": "ckpt-bucket"},
             "s3Endpoint": {"enabled": True, "port": 9480,
                            "credentialsSecretRef": {"name": "s3-keys"}}},
}
SETTINGS = OperatorSettings(workload_namespace="cistern-system")
SOURCE = {"metadata": {"name": "s3-keys", "namespace": "ml"},
          "data": {"accessKeyId": "QUtJQQ==", "secretAccessKey": "c2VjcmV0",
                   "AWS_SESSION_TOKEN": "eA=="}}


def rendered(body: dict[str, Any] = BODY) -> dict[str, Any]:
    spec = WriteCacheSpec.from_dict(body["spec"])
    config = manifests.node_config("ckpt", "ml", spec, SETTINGS)
    return {"spec": spec, "config": config,
            "configmap": manifests.configmap(body, config, SETTINGS),
            "daemonset": manifests.daemonset(body, spec, config, SETTINGS),
            "service": s3endpoint.service(body, spec, SETTINGS),
            "copy": s3endpoint.credentials_copy(body, SOURCE, SETTINGS)}


@pytest.mark.parametrize("kind", ["configmap", "daemonset", "service", "copy"])
def test_valid_kubernetes_objects(kind: str) -> None:
    kubernetes_validate.validate(rendered()[kind], "1.32.0", strict=True)


def test_node_config_serves_s3_on_the_pod_with_the_mounted_keys() -> None:
    objs = rendered()
    config = NodeConfig.from_dict(yaml.safe_load(objs["configmap"]["data"]["node.yaml"]))
    assert config.s3_endpoint.listen == "0.0.0.0:9480"
    assert config.s3_endpoint.credentials_dir == manifests.S3_CREDENTIALS_DIR
    pod = objs["daemonset"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert {"name": "s3", "containerPort": 9480, "protocol": "TCP"} in container["ports"]
    mount = next(m for m in container["volumeMounts"] if m["name"] == "s3-credentials")
    assert mount == {"name": "s3-credentials", "mountPath": manifests.S3_CREDENTIALS_DIR,
                     "readOnly": True}
    volume = next(v for v in pod["volumes"] if v["name"] == "s3-credentials")
    assert volume["secret"]["secretName"] == objs["copy"]["metadata"]["name"]
    assert objs["copy"]["metadata"]["name"] == "cistern-ml.ckpt-s3-credentials"


def test_disabled_endpoint_renders_nothing() -> None:
    body = copy.deepcopy(BODY)
    body["spec"]["s3Endpoint"] = {"enabled": False}
    objs = rendered(body)
    assert not objs["config"].s3_endpoint.enabled
    assert not yaml.safe_load(objs["configmap"]["data"]["node.yaml"]).get("s3Endpoint")
    container = objs["daemonset"]["spec"]["template"]["spec"]["containers"][0]
    assert [p["name"] for p in container["ports"]] == ["control"]
    assert all(m["name"] != "s3-credentials" for m in container["volumeMounts"])
    assert s3endpoint.endpoint_url(body, objs["spec"], SETTINGS) is None


def test_service_routes_node_locally_to_this_caches_daemons() -> None:
    objs = rendered()
    svc = objs["service"]
    assert svc["metadata"]["namespace"] == "cistern-system"
    assert svc["spec"]["internalTrafficPolicy"] == "Local"
    assert svc["spec"]["ports"] == [{"name": "s3", "protocol": "TCP", "port": 9480,
                                     "targetPort": "s3"}]
    pod_labels = objs["daemonset"]["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert svc["spec"]["selector"][manifests.LABEL_NAMESPACE] == "ml"
    url = s3endpoint.endpoint_url(BODY, objs["spec"], SETTINGS)
    assert url == f"http://{svc['metadata']['name']}.cistern-system.svc:9480"


def test_secret_copy_holds_only_the_endpoint_keys() -> None:
    copied = rendered()["copy"]
    assert copied["data"] == {"accessKeyId": "QUtJQQ==", "secretAccessKey": "c2VjcmV0"}
    assert copied["metadata"]["annotations"]["cistern.dev/copied-from"] == "ml/s3-keys"
    assert s3endpoint.missing_keys(SOURCE) == []
    assert s3endpoint.missing_keys({"data": {"accessKeyId": "QUtJQQ=="}}) == ["secretAccessKey"]


def test_service_names_are_dns_labels_and_never_shared() -> None:
    seen = set()
    for namespace, name in (("a-b", "c"), ("a", "b-c"), ("ml", "x" * 63), ("n" * 63, "ckpt")):
        service = manifests.names(name, namespace).s3_service
        assert len(service) <= 63
        assert service.replace("-", "").isalnum() and service[0].isalpha()
        seen.add(service)
    assert len(seen) == 4


@pytest.mark.parametrize(("endpoint", "reason"), [
    ({"enabled": True}, "spec.s3Endpoint.credentialsSecretRef: required"),
    ({"enabled": True, "port": 80, "credentialsSecretRef": {"name": "k"}},
     "spec.s3Endpoint.port: expected a port number from 1024 to 65535"),
    ({"enabled": True, "port": "9470", "credentialsSecretRef": {"name": "k"}},
     "spec.s3Endpoint.port"),
    ({"enabled": True, "credentialsSecretRef": {"name": "Not_A_Name"}},
     "spec.s3Endpoint.credentialsSecretRef.name: expected a Secret name"),
    ({"enabled": "yes please"}, "spec.s3Endpoint.enabled"),
    ({"enabled": True, "listen": "0.0.0.0:1", "credentialsSecretRef": {"name": "k"}},
     "spec.s3Endpoint: unknown field(s) listen"),
])
def test_bad_endpoint_specs_are_refused_with_a_reason(endpoint: dict[str, Any],
                                                      reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        WriteCacheSpec.from_dict({"objectStore": {"bucket": "ckpt-bucket"},
                                  "s3Endpoint": endpoint})
    assert reason in str(info.value)

"""Issue 18 against KMock: spec.s3Endpoint renders the node config, the key copy, the DaemonSet's
port and mount and a node-local Service; the status carries the URL; bad specs are refused."""

from __future__ import annotations

import base64
from typing import Any

import pytest
import yaml

from cistern.config import NodeConfig
from cistern.operator import manifests
from cistern.operator.kubeapi import CONFIGMAPS, DAEMONSETS, SECRETS, SERVICES, WRITECACHES

from .conftest import NAMESPACE, WORKLOAD, Cluster, operator_settings, running_operator, wait_for

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(90)]

SERVICE = manifests.names("ckpt", NAMESPACE).s3_service
COPY = "cistern-ml.ckpt-s3-credentials"


def writecache(endpoint: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "cistern.dev/v1alpha1", "kind": "WriteCache",
            "metadata": {"name": "ckpt", "namespace": NAMESPACE},
            "spec": {"objectStore": {"bucket": "training-ckpt"}, "drain": {"timeout": "1m"},
                     "s3Endpoint": endpoint}}


ON = {"enabled": True, "port": 9480, "credentialsSecretRef": {"name": "s3-keys"}}


async def endpoint_keys(cluster: Cluster, **data: str) -> None:
    await cluster.api.create(SECRETS, {"apiVersion": "v1", "kind": "Secret",
                                       "metadata": {"name": "s3-keys"}, "stringData": data},
                             NAMESPACE)


def status_url(cluster: Cluster) -> str | None:
    return ((cluster.writecache("ckpt") or {}).get("status") or {}).get("s3Endpoint")


async def test_endpoint_is_rendered_reported_and_removed(cluster: Cluster) -> None:
    await endpoint_keys(cluster, accessKeyId="ckpt-writer", secretAccessKey="s3cret")
    async with running_operator(cluster, operator_settings(cluster)):
        await cluster.api.create(WRITECACHES, writecache(ON), NAMESPACE)
        url = await wait_for(lambda: status_url(cluster), what="status.s3Endpoint")
        assert url == f"http://{SERVICE}.{WORKLOAD}.svc:9480"

        svc = await cluster.api.get(SERVICES, SERVICE, WORKLOAD)
        assert svc is not None and svc["spec"]["internalTrafficPolicy"] == "Local"
        assert svc["spec"]["ports"][0]["port"] == 9480
        ds = await cluster.api.get(DAEMONSETS, "cistern-ml.ckpt", WORKLOAD)
        assert ds is not None
        pod = ds["spec"]["template"]
        assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
        container = pod["spec"]["containers"][0]
        assert {"name": "s3", "containerPort": 9480, "protocol": "TCP"} in container["ports"]
        volume = next(v for v in pod["spec"]["volumes"] if v["name"] == "s3-credentials")
        assert volume["secret"]["secretName"] == COPY
        copy = await cluster.api.get(SECRETS, COPY, WORKLOAD)
        assert copy is not None
        assert {k: base64.b64decode(v).decode() for k, v in copy["data"].items()} == {
            "accessKeyId": "ckpt-writer", "secretAccessKey": "s3cret"}
        cm = await cluster.api.get(CONFIGMAPS, "cistern-ml.ckpt-config", WORKLOAD)
        assert cm is not None
        config = NodeConfig.from_dict(yaml.safe_load(cm["data"]["node.yaml"]))
        assert config.s3_endpoint.listen == "0.0.0.0:9480"
        assert config.s3_endpoint.credentials_dir == manifests.S3_CREDENTIALS_DIR

        # A rotated key reaches the copy the daemons read.
        await cluster.api.patch(SECRETS, "s3-keys", {"data": {
            "secretAccessKey": base64.b64encode(b"rotated").decode()}}, NAMESPACE)

        async def rotated() -> bool:
            copy = await cluster.api.get(SECRETS, COPY, WORKLOAD)
            return copy is not None and base64.b64decode(
                copy["data"]["secretAccessKey"]) == b"rotated"

        await wait_for(rotated, what="the rotated key copied")

        # Turned off: no Service, no copy, no URL, no port.
        await cluster.api.patch(WRITECACHES, "ckpt", {"spec": {"s3Endpoint": {
            "enabled": False}}}, NAMESPACE)

        async def off() -> bool:
            return status_url(cluster) is None and await cluster.api.get(
                SERVICES, SERVICE, WORKLOAD) is None and await cluster.api.get(
                SECRETS, COPY, WORKLOAD) is None

        await wait_for(off, what="the endpoint removed")
        ds = await cluster.api.get(DAEMONSETS, "cistern-ml.ckpt", WORKLOAD)
        assert ds is not None
        assert [p["name"] for p in ds["spec"]["template"]["spec"]["containers"][0]["ports"]] \
            == ["control"]

        # On again, then the WriteCache deleted: its Service and copy go with it.
        await cluster.api.patch(WRITECACHES, "ckpt", {"spec": {"s3Endpoint": ON}}, NAMESPACE)
        await wait_for(lambda: cluster.api.get(SERVICES, SERVICE, WORKLOAD),
                       what="the Service back")
        await cluster.api.delete(WRITECACHES, "ckpt", NAMESPACE)

        async def gone() -> bool:
            return await cluster.api.get(SERVICES, SERVICE, WORKLOAD) is None and \
                await cluster.api.get(SECRETS, COPY, WORKLOAD) is None and \
                await cluster.api.get(DAEMONSETS, "cistern-ml.ckpt", WORKLOAD) is None

        await wait_for(gone, what="the cache's objects removed")


@pytest.mark.parametrize("endpoint, keys, reason, needle", [
    ({"enabled": True}, {}, "InvalidSpec", "spec.s3Endpoint.credentialsSecretRef: required"),
    ({"enabled": True, "port": 80, "credentialsSecretRef": {"name": "s3-keys"}}, {},
     "InvalidSpec", "spec.s3Endpoint.port"),
    ({"enabled": True, "port": "CONTROL", "credentialsSecretRef": {"name": "s3-keys"}},
     {"accessKeyId": "a", "secretAccessKey": "b"}, "InvalidSpec", "control port"),
    (ON, {}, "SecretNotFound", "spec.s3Endpoint.credentialsSecretRef"),
    (ON, {"accessKeyId": "a"}, "SecretInvalid", "lacks secretAccessKey"),
])
async def test_bad_endpoint_spec_is_refused_with_a_reason(
        cluster: Cluster, endpoint: dict[str, Any], keys: dict[str, str], reason: str,
        needle: str) -> None:
    if keys:
        await endpoint_keys(cluster, **keys)
    if endpoint.get("port") == "CONTROL":
        endpoint = {**endpoint, "port": cluster.control_port}
    async with running_operator(cluster, operator_settings(cluster)):
        await cluster.api.create(WRITECACHES, writecache(endpoint), NAMESPACE)

        def degraded() -> dict[str, Any] | None:
            cond = cluster.condition("ckpt", "Degraded")
            return cond if cond and cond["status"] == "True" else None

        cond = await wait_for(degraded, what="Degraded")
        assert cond["reason"] == reason and needle in cond["message"], cond
        assert await cluster.api.get(DAEMONSETS, "cistern-ml.ckpt", WORKLOAD) is None
        assert await cluster.api.get(SERVICES, SERVICE, WORKLOAD) is None
        assert status_url(cluster) is None

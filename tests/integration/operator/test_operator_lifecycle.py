"""The operator end to end against KMock: create, rollout, no-op, bad specs."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import kmock
import pytest
import yaml

from cistern.config import NodeConfig
from cistern.operator.kubeapi import CONFIGMAPS, DAEMONSETS, SECRETS, WRITECACHES
from support.s3server import MotoServer, free_port

from .conftest import NAMESPACE, WORKLOAD, Cluster, operator_settings, running_operator, wait_for

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(90)]


def writecache(name: str = "ckpt", **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "objectStore": {"bucket": "training-ckpt", "prefix": "run1",
                        "credentialsSecretRef": {"name": "s3-creds"}},
        "flush": {"uploadDelay": "2s"},
        "drain": {"timeout": "10m"},
    }
    body.update(spec)
    return {"apiVersion": "cistern.dev/v1alpha1", "kind": "WriteCache",
            "metadata": {"name": name, "namespace": NAMESPACE}, "spec": body}


async def create_credentials(cluster: Cluster) -> None:
    await cluster.api.create(SECRETS, {
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3-creds"},
        "stringData": {"AWS_ACCESS_KEY_ID": "AKIATEST", "AWS_SECRET_ACCESS_KEY": "secret"}},
        NAMESPACE)


async def test_create_renders_daemonset_configmap_storageclass(cluster: Cluster) -> None:
    await create_credentials(cluster)
    async with running_operator(cluster, operator_settings(cluster)):
        await cluster.api.create(WRITECACHES, writecache(), NAMESPACE)
        ds = await wait_for(lambda: cluster.api.get(DAEMONSETS, "cistern-ml.ckpt", WORKLOAD),
                            what="the DaemonSet")
        # Privileged pods run in the operator's namespace, never in the tenant's (issue 13);
        # an owner reference cannot cross namespaces, so labels say whose they are.
        assert "ownerReferences" not in ds["metadata"]
        assert ds["metadata"]["labels"]["cistern.dev/writecache"] == "ckpt"
        assert ds["metadata"]["labels"]["cistern.dev/writecache-namespace"] == NAMESPACE
        assert not [d for d in cluster.kmock.objects
                    if d[0] == kmock.resource("apps/v1/daemonsets") and d[1] == NAMESPACE]

        pod = ds["spec"]["template"]["spec"]
        container = pod["containers"][0]
        assert container["securityContext"] == {"privileged": True}
        assert container["command"][:2] == ["cistern-node", "run"]
        assert container["readinessProbe"]["httpGet"] == {"path": "/status", "port": "control"}
        assert container["resources"]["requests"] == {"cpu": "500m", "memory": "1Gi"}
        mounts = {m["name"]: m for m in container["volumeMounts"]}
        assert mounts["mounts"]["mountPropagation"] == "Bidirectional"
        assert mounts["mounts"]["mountPath"] == "/var/lib/cistern/mounts"
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["fuse"]["hostPath"] == {"path": "/dev/fuse", "type": "CharDevice"}
        assert volumes["cache"]["hostPath"]["path"] == "/var/lib/cistern/cache/ml/ckpt"
        env = {e["name"]: e for e in container["env"]}
        assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {
            "name": "cistern-ml.ckpt-credentials", "key": "AWS_SECRET_ACCESS_KEY"}
        copied = await cluster.api.get(SECRETS, "cistern-ml.ckpt-credentials", WORKLOAD)
        source = await cluster.api.get(SECRETS, "s3-creds", NAMESPACE)
        assert copied is not None and source is not None and copied["data"] == source["data"]
        access = await wait_for(lambda: cluster.api.get(CONFIGMAPS, "cistern-access", WORKLOAD))
        assert json.loads(access["data"]["ml.ckpt.json"]) == {
            "writeCache": "ml/ckpt", "namespaces": ["ml"]}

        cm = await wait_for(lambda: cluster.api.get(CONFIGMAPS, "cistern-ml.ckpt-config",
                                                    WORKLOAD), what="the ConfigMap")
        config = NodeConfig.from_dict(yaml.safe_load(cm["data"]["node.yaml"]))
        assert config.store.url == "s3://training-ckpt/run1"
        assert config.mount == "/var/lib/cistern/mounts/ml.ckpt"
        assert config.flush.upload_delay == 2.0
        assert config.control == f"0.0.0.0:{cluster.control_port}"
        assert config.control_token_file == "/etc/cistern-control/token"
        assert "AKIATEST" not in cm["data"]["node.yaml"]  # credentials never in a ConfigMap

        sc = await wait_for(lambda: cluster.obj("storage.k8s.io/v1/storageclasses",
                                                "cistern-ckpt", None), what="the StorageClass")
        assert sc["provisioner"] == "csi.cistern.dev"
        assert sc["parameters"] == {"writeCache": "ckpt", "writeCacheNamespace": "ml"}
        assert sc["reclaimPolicy"] == "Delete"

        status = await wait_for(lambda: _status_with(cluster, "observedGeneration"),
                                what="observedGeneration")
        assert status["observedGeneration"] == 1
        assert status["storageClassName"] == "cistern-ckpt"
        assert (cluster.condition("ckpt", "Degraded") or {}).get("status") == "False"
        assert await wait_for(lambda: cluster.events("Applied"), what="an Applied event")


async def _status_with(cluster: Cluster, key: str) -> dict[str, Any] | None:
    wc = cluster.writecache("ckpt") or {}
    status = wc.get("status") or {}
    return status if key in status else None


async def test_spec_change_rolls_out_and_unchanged_spec_writes_nothing(cluster: Cluster) -> None:
    await create_credentials(cluster)
    async with running_operator(cluster, operator_settings(cluster)):
        await cluster.api.create(WRITECACHES, writecache(), NAMESPACE)
        ds = await wait_for(lambda: cluster.api.get(DAEMONSETS, "cistern-ml.ckpt", WORKLOAD))
        old_hash = ds["spec"]["template"]["metadata"]["annotations"]["cistern.dev/config-hash"]
        await cluster.schedule_daemons("ckpt")
        await wait_for(lambda: _condition_is(cluster, "Ready", "True"), what="Ready")

        # Steady state: several status polls, no writes to the owned objects.
        before = {r: len(cluster.writes(r)) for r in ("daemonsets", "configmaps",
                                                      "storageclasses", "secrets")}
        await cluster.daemons["node-a"].polled(3)
        after = {r: len(cluster.writes(r)) for r in before}
        assert after == before

        await cluster.api.patch(WRITECACHES, "ckpt", {"spec": {
            "flush": {"uploadDelay": "5s", "maxBytesPerSecond": "200Mi"},
            "resources": {"requests": {"cpu": "2", "memory": "4Gi"}}}}, NAMESPACE)

        async def rolled() -> dict[str, Any] | None:
            ds = await cluster.api.get(DAEMONSETS, "cistern-ml.ckpt", WORKLOAD)
            annotations = ds["spec"]["template"]["metadata"]["annotations"]
            return ds if annotations["cistern.dev/config-hash"] != old_hash else None

        ds = await wait_for(rolled, what="a new config hash in the pod template")
        assert ds["spec"]["template"]["spec"]["containers"][0]["resources"] == {
            "requests": {"cpu": "2", "memory": "4Gi"}}
        cm = await cluster.api.get(CONFIGMAPS, "cistern-ml.ckpt-config", WORKLOAD)
        config = NodeConfig.from_dict(yaml.safe_load(cm["data"]["node.yaml"]))
        assert config.flush.upload_delay == 5.0
        assert config.flush.max_bytes_per_second == 200 * 2**20
        status = await wait_for(lambda: _observed(cluster, 2), what="observedGeneration 2")
        assert status["observedGeneration"] == 2
        # The DaemonSet controller has not caught up: Progressing.
        progressing = await wait_for(lambda: _condition_is(cluster, "Progressing", "True"))
        assert progressing["reason"] == "RollingOut"


async def _observed(cluster: Cluster, generation: int) -> dict[str, Any] | None:
    status = (cluster.writecache("ckpt") or {}).get("status") or {}
    return status if status.get("observedGeneration") == generation else None


async def _condition_is(cluster: Cluster, kind: str, value: str,
                        name: str = "ckpt") -> dict[str, Any] | None:
    cond = cluster.condition(name, kind)
    return cond if cond and cond["status"] == value else None


async def test_invalid_spec_is_degraded_and_never_tears_down(cluster: Cluster) -> None:
    await create_credentials(cluster)
    async with running_operator(cluster, operator_settings(cluster)):
        # The schema would reject this at admission; KMock has none, so the handler must.
        await cluster.api.create(WRITECACHES, writecache(
            "broken", cache={"highWatermark": 0.5, "lowWatermark": 0.7}), NAMESPACE)
        degraded = await wait_for(lambda: _condition_is(cluster, "Degraded", "True", "broken"))
        assert degraded["reason"] == "InvalidSpec"
        assert "lowWatermark" in degraded["message"]
        assert await cluster.api.get(DAEMONSETS, "cistern-ml.broken", WORKLOAD) is None
        assert await wait_for(lambda: cluster.events("InvalidSpec"))

        # A working cache, then a bad update: the daemons keep the old configuration.
        await cluster.api.create(WRITECACHES, writecache(), NAMESPACE)
        ds = await wait_for(lambda: cluster.api.get(DAEMONSETS, "cistern-ml.ckpt", WORKLOAD))
        cm = await wait_for(lambda: cluster.api.get(CONFIGMAPS, "cistern-ml.ckpt-config",
                                                    WORKLOAD))
        await cluster.api.patch(WRITECACHES, "ckpt", {"spec": {"flush": {"partSize": "1Mi"}}},
                                NAMESPACE)
        degraded = await wait_for(lambda: _condition_is(cluster, "Degraded", "True"))
        assert degraded["reason"] == "InvalidSpec"
        assert "partSize" in degraded["message"]
        assert await cluster.api.get(DAEMONSETS, "cistern-ml.ckpt", WORKLOAD) == ds
        assert (await cluster.api.get(CONFIGMAPS, "cistern-ml.ckpt-config", WORKLOAD)) == cm

        # Fixing the spec clears Degraded and rolls out.
        await cluster.api.patch(WRITECACHES, "ckpt", {"spec": {"flush": {"partSize": "32Mi"}}},
                                NAMESPACE)
        await wait_for(lambda: _condition_is(cluster, "Degraded", "False"))
        cm = await cluster.api.get(CONFIGMAPS, "cistern-ml.ckpt-config", WORKLOAD)
        assert NodeConfig.from_dict(yaml.safe_load(cm["data"]["node.yaml"])).flush.part_size \
            == 32 * 2**20


async def test_missing_secret_is_degraded_until_it_appears(cluster: Cluster) -> None:
    async with running_operator(cluster, operator_settings(cluster)):
        await cluster.api.create(WRITECACHES, writecache(), NAMESPACE)
        degraded = await wait_for(lambda: _condition_is(cluster, "Degraded", "True"))
        assert degraded["reason"] == "SecretNotFound"
        assert "ml/s3-creds" in degraded["message"]
        assert await cluster.api.get(DAEMONSETS, "cistern-ml.ckpt", WORKLOAD) is None
        await create_credentials(cluster)
        await wait_for(lambda: cluster.api.get(DAEMONSETS, "cistern-ml.ckpt", WORKLOAD),
                       what="the DaemonSet after the Secret appeared")
        await wait_for(lambda: _condition_is(cluster, "Degraded", "False"))


async def test_unreachable_or_missing_bucket_is_degraded(cluster: Cluster) -> None:
    """The operator probes the bucket with the WriteCache's credentials (a real moto S3)."""
    with MotoServer() as s3:
        await cluster.api.create(SECRETS, {
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3-creds"},
            "stringData": {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}},
            NAMESPACE)
        settings = operator_settings(cluster, check_object_store=True)
        async with running_operator(cluster, settings):
            await cluster.api.create(WRITECACHES, writecache(objectStore={
                "bucket": "training-ckpt", "endpoint": s3.endpoint, "pathStyle": True,
                "region": "us-east-1", "credentialsSecretRef": {"name": "s3-creds"}}), NAMESPACE)
            degraded = await wait_for(lambda: _condition_is(cluster, "Degraded", "True"))
            assert degraded["reason"] == "BucketNotFound"
            assert "training-ckpt" in degraded["message"]
            assert "testing" not in degraded["message"]  # no credentials in status
            assert await cluster.api.get(DAEMONSETS, "cistern-ml.ckpt", WORKLOAD) is None

            await asyncio.to_thread(s3.client().create_bucket, Bucket="training-ckpt")
            await wait_for(lambda: cluster.api.get(DAEMONSETS, "cistern-ml.ckpt", WORKLOAD),
                           what="the rollout once the bucket exists")
            await wait_for(lambda: _condition_is(cluster, "Degraded", "False"))

            # An endpoint nobody listens on: unreachable, and the running cache stays.
            dead = f"http://127.0.0.1:{free_port()}"
            await cluster.api.patch(WRITECACHES, "ckpt", {"spec": {"objectStore": {
                "endpoint": dead}}}, NAMESPACE)
            degraded = await wait_for(lambda: _condition_is(cluster, "Degraded", "True"))
            assert degraded["reason"] == "BucketUnreachable"
            cm = await cluster.api.get(CONFIGMAPS, "cistern-ml.ckpt-config", WORKLOAD)
            assert s3.endpoint in cm["data"]["node.yaml"]

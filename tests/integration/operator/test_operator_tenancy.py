"""Issue 13 against KMock: privileged objects in the operator's namespace, names that cannot
collide across namespaces, credentials copied and kept in sync, placement limits, access."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
import yaml

from cistern.config import NodeConfig
from cistern.operator.kubeapi import CONFIGMAPS, DAEMONSETS, NODES, SECRETS, WRITECACHES

from .conftest import NAMESPACE, WORKLOAD, Cluster, operator_settings, running_operator, wait_for

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(90)]

OTHER = "team-b"


def writecache(namespace: str, name: str = "ckpt", **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "cistern.dev/v1alpha1", "kind": "WriteCache",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"objectStore": {"bucket": "training-ckpt",
                                     "credentialsSecretRef": {"name": "s3-creds"}},
                     "drain": {"timeout": "1m"}, **spec}}


async def credentials(cluster: Cluster, namespace: str, key_id: str) -> None:
    await cluster.api.create(SECRETS, {
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3-creds"},
        "stringData": {"AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": "secret"}},
        namespace)


async def labels_of(cluster: Cluster, node: str) -> dict[str, str]:
    obj = await cluster.api.get(NODES, node)
    return dict(((obj or {}).get("metadata") or {}).get("labels") or {})


async def access(cluster: Cluster) -> dict[str, Any]:
    cm = await cluster.api.get(CONFIGMAPS, "cistern-access", WORKLOAD)
    return {k: json.loads(v) for k, v in ((cm or {}).get("data") or {}).items() if v}


async def test_two_same_named_writecaches_in_two_namespaces(cluster: Cluster) -> None:
    await credentials(cluster, NAMESPACE, "AKIA-ML")
    await credentials(cluster, OTHER, "AKIA-TEAM-B")
    async with running_operator(cluster, operator_settings(cluster)):
        await cluster.api.create(WRITECACHES, writecache(NAMESPACE), NAMESPACE)
        await cluster.api.create(WRITECACHES, writecache(OTHER), OTHER)
        ml = await wait_for(lambda: cluster.api.get(DAEMONSETS, "cistern-ml.ckpt", WORKLOAD))
        other = await wait_for(lambda: cluster.api.get(DAEMONSETS, "cistern-team-b.ckpt",
                                                       WORKLOAD))
        configs = {}
        for key in ("ml.ckpt", "team-b.ckpt"):
            cm = await wait_for(lambda key=key: cluster.api.get(
                CONFIGMAPS, f"cistern-{key}-config", WORKLOAD))
            configs[key] = NodeConfig.from_dict(yaml.safe_load(cm["data"]["node.yaml"]))
        # Mount path, host cache path, credentials: one each.
        assert configs["ml.ckpt"].mount != configs["team-b.ckpt"].mount
        host = {name: {v["name"]: v for v in ds["spec"]["template"]["spec"]["volumes"]}
                ["cache"]["hostPath"]["path"] for name, ds in (("ml", ml), ("b", other))}
        assert host == {"ml": "/var/lib/cistern/cache/ml/ckpt",
                        "b": "/var/lib/cistern/cache/team-b/ckpt"}
        for key, key_id in (("ml.ckpt", "AKIA-ML"), ("team-b.ckpt", "AKIA-TEAM-B")):
            copy = await wait_for(lambda key=key: cluster.api.get(
                SECRETS, f"cistern-{key}-credentials", WORKLOAD))
            assert base64.b64decode(copy["data"]["AWS_ACCESS_KEY_ID"]).decode() == key_id

        await cluster.schedule_daemons("ckpt", namespace=NAMESPACE)
        await cluster.schedule_daemons("ckpt", namespace=OTHER)

        async def both_labelled() -> bool:
            labels = await labels_of(cluster, "node-a")
            return labels.get("csi.cistern.dev/ml.ckpt") == "true" and \
                labels.get("csi.cistern.dev/team-b.ckpt") == "true"

        await wait_for(both_labelled, what="both caches' labels on node-a")
        policies = await wait_for(lambda: _both_policies(cluster))
        assert policies["ml.ckpt.json"]["namespaces"] == ["ml"]
        assert policies["team-b.ckpt.json"]["namespaces"] == ["team-b"]

        # Deleting team-b's cache leaves ml's label, DaemonSet, policy and credentials alone.
        await cluster.api.delete(WRITECACHES, "ckpt", OTHER)

        async def other_gone() -> bool:
            labels = await labels_of(cluster, "node-a")
            return "csi.cistern.dev/team-b.ckpt" not in labels and await cluster.api.get(
                DAEMONSETS, "cistern-team-b.ckpt", WORKLOAD) is None

        await wait_for(other_gone, what="team-b's cache removed")
        for node in ("node-a", "node-b"):
            assert (await labels_of(cluster, node)).get("csi.cistern.dev/ml.ckpt") == "true"
        assert await cluster.api.get(DAEMONSETS, "cistern-ml.ckpt", WORKLOAD) is not None
        assert await cluster.api.get(SECRETS, "cistern-ml.ckpt-credentials", WORKLOAD)
        assert await cluster.api.get(SECRETS, "cistern-team-b.ckpt-credentials", WORKLOAD) \
            is None
        assert list(await access(cluster)) == ["ml.ckpt.json"]


async def _both_policies(cluster: Cluster) -> dict[str, Any] | None:
    policies = await access(cluster)
    return policies if len(policies) == 2 else None


async def test_credentials_copy_follows_its_source(cluster: Cluster) -> None:
    await credentials(cluster, NAMESPACE, "AKIA-OLD")
    async with running_operator(cluster, operator_settings(cluster)):
        await cluster.api.create(WRITECACHES, writecache(NAMESPACE), NAMESPACE)

        async def copied(value: str) -> bool:
            copy = await cluster.api.get(SECRETS, "cistern-ml.ckpt-credentials", WORKLOAD)
            return copy is not None and base64.b64decode(
                copy["data"]["AWS_ACCESS_KEY_ID"]).decode() == value

        await wait_for(lambda: copied("AKIA-OLD"), what="the first copy")
        await cluster.api.patch(SECRETS, "s3-creds", {"data": {
            "AWS_ACCESS_KEY_ID": base64.b64encode(b"AKIA-ROTATED").decode()}}, NAMESPACE)
        await wait_for(lambda: copied("AKIA-ROTATED"), what="the rotated key copied")


async def test_access_shares_with_listed_and_selected_namespaces(cluster: Cluster) -> None:
    async with running_operator(cluster, operator_settings(cluster)):
        await cluster.api.create(WRITECACHES, writecache(NAMESPACE, objectStore={
            "bucket": "training-ckpt"}, access={
                "namespaces": ["eval"],
                "namespaceSelector": {"matchLabels": {"cistern.dev/share": "ckpt"}}}),
            NAMESPACE)

        async def policy() -> dict[str, Any] | None:
            return (await access(cluster)).get("ml.ckpt.json")

        found = await wait_for(policy, what="the access policy")
        assert found == {"writeCache": "ml/ckpt", "namespaces": ["eval", "ml", "team-b"]}


@pytest.mark.parametrize("spec, reason, needle", [
    ({"nodeSelector": {"node-role.kubernetes.io/control-plane": ""}}, "PlacementForbidden",
     "control-plane"),
    ({"tolerations": [{"operator": "Exists"}]}, "PlacementForbidden", "every taint"),
    ({"nodeSelector": {"kubernetes.io/hostname": "etcd-0"}}, "PlacementForbidden",
     "kubernetes.io/hostname"),
    ({"drain": {"timeout": "100000h"}}, "DrainTimeoutTooLong", "drain.maxTimeout"),
])
async def test_placement_and_drain_bounds_are_enforced(cluster: Cluster, spec: dict[str, Any],
                                                       reason: str, needle: str) -> None:
    settings = operator_settings(cluster, allowed_node_selector_keys=("cistern.dev/nvme",),
                                 max_drain_timeout=3600.0)
    async with running_operator(cluster, settings):
        await cluster.api.create(WRITECACHES, writecache(
            NAMESPACE, objectStore={"bucket": "training-ckpt"}, **spec), NAMESPACE)

        def degraded() -> dict[str, Any] | None:
            cond = cluster.condition("ckpt", "Degraded")
            return cond if cond and cond["status"] == "True" else None

        cond = await wait_for(degraded, what="Degraded")
        assert cond["reason"] == reason and needle in cond["message"]
        assert await cluster.api.get(DAEMONSETS, "cistern-ml.ckpt", WORKLOAD) is None

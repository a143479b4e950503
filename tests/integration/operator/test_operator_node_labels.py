"""Node topology labels (csi.cistern.dev/<writecache>=true) follow the daemons, against KMock."""

from __future__ import annotations

from typing import Any

import pytest

from cistern.operator.kubeapi import DAEMONSETS, NODES, PODS, WRITECACHES

from .conftest import NAMESPACE, WORKLOAD, Cluster, operator_settings, running_operator, wait_for

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(90)]

LABEL = "csi.cistern.dev/ml.ckpt"
SELECTOR = {"cistern.dev/nvme": "true"}


async def node_labels(cluster: Cluster, node: str) -> dict[str, str]:
    obj = await cluster.api.get(NODES, node)
    assert obj is not None
    return dict(obj["metadata"].get("labels") or {})


async def labelled(cluster: Cluster) -> set[str]:
    return {node for node in ("node-a", "node-b", "node-c")
            if (await cluster.api.get(NODES, node) or {"metadata": {}})["metadata"]
            .get("labels", {}).get(LABEL) == "true"}


def writecache() -> dict[str, Any]:
    return {"apiVersion": "cistern.dev/v1alpha1", "kind": "WriteCache",
            "metadata": {"name": "ckpt", "namespace": NAMESPACE},
            "spec": {"objectStore": {"bucket": "training-ckpt"}, "nodeSelector": SELECTOR}}


async def test_nodes_running_the_cache_are_labelled_and_unlabelled(cluster: Cluster) -> None:
    for node in ("node-a", "node-b"):
        await cluster.api.patch(NODES, node, {"metadata": {"labels": {
            **SELECTOR, "kubernetes.io/hostname": node}}})
    # A third node matches the selector but runs no daemon (yet): it gets no label.
    await cluster.api.create(NODES, {"apiVersion": "v1", "kind": "Node",
                                     "metadata": {"name": "node-c", "labels": SELECTOR},
                                     "spec": {}})
    async with running_operator(cluster, operator_settings(cluster)):
        await cluster.api.create(WRITECACHES, writecache(), NAMESPACE)
        await wait_for(lambda: cluster.api.get(DAEMONSETS, "cistern-ml.ckpt", WORKLOAD),
                       what="the DaemonSet")
        await cluster.schedule_daemons("ckpt")

        async def both() -> bool:
            return await labelled(cluster) == {"node-a", "node-b"}

        await wait_for(both, what="labels on node-a and node-b")
        assert (await node_labels(cluster, "node-a"))["kubernetes.io/hostname"] == "node-a"

        # node-b no longer matches the nodeSelector: the label goes even before the
        # DaemonSet controller removes the daemon pod.
        await cluster.api.patch(NODES, "node-b", {"metadata": {"labels": {
            "cistern.dev/nvme": None}}})

        async def only_a() -> bool:
            return await labelled(cluster) == {"node-a"}

        await wait_for(only_a, what="node-b's label removed")
        # node-b matches again while its daemon pod still runs: labelled again; once the
        # pod is gone for good, unlabelled.
        await cluster.api.patch(NODES, "node-b", {"metadata": {"labels": SELECTOR}})
        await wait_for(both, what="node-b labelled again")
        await cluster.api.delete(PODS, "cistern-ckpt-node-b", WORKLOAD)
        await wait_for(only_a, what="node-b's label removed with its daemon")
        # Other labels are untouched.
        assert (await node_labels(cluster, "node-b"))["kubernetes.io/hostname"] == "node-b"

        # Deleting the WriteCache removes the label from every node.
        await cluster.api.delete(WRITECACHES, "ckpt", NAMESPACE)
        await wait_for(lambda: cluster.writecache("ckpt") is None, what="the WriteCache gone")

        async def none() -> bool:
            return not await labelled(cluster)

        await wait_for(none, what="every label removed")
        assert (await node_labels(cluster, "node-a"))["cistern.dev/nvme"] == "true"
        patches = [r for r in cluster.writes("nodes") if r.method == "PATCH"
                   and LABEL in str(r.data)]
        assert patches, "the operator patched the node labels"

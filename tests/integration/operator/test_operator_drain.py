"""Node drains and WriteCache deletion against KMock, with daemon stand-ins on 127.0.0.x."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from cistern.nodestatus import StoreErrorReport
from cistern.operator.kubeapi import (
    DAEMONSETS,
    NODES,
    PDBS,
    PODS,
    SECRETS,
    WRITECACHES,
)

from .conftest import NAMESPACE, WORKLOAD, Cluster, operator_settings, running_operator, wait_for

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(90)]

GUARD_A = "cistern-guard-ckpt-node-a"
GUARD_B = "cistern-guard-ckpt-node-b"


def writecache(drain_timeout: str = "10m") -> dict[str, Any]:
    return {"apiVersion": "cistern.dev/v1alpha1", "kind": "WriteCache",
            "metadata": {"name": "ckpt", "namespace": NAMESPACE},
            "spec": {"objectStore": {"bucket": "training-ckpt"},
                     "drain": {"timeout": drain_timeout}}}


async def deploy(cluster: Cluster, drain_timeout: str = "10m") -> str:
    """A running WriteCache with daemons on both nodes; returns the control token."""
    await cluster.api.create(WRITECACHES, writecache(drain_timeout), NAMESPACE)
    await wait_for(lambda: cluster.api.get(DAEMONSETS, "cistern-ml.ckpt", WORKLOAD),
                   what="the DaemonSet")
    secret = await wait_for(lambda: cluster.api.get(SECRETS, "cistern-ml.ckpt-control", WORKLOAD))
    token = base64.b64decode(secret["data"]["token"]).decode()
    for daemon in cluster.daemons.values():
        daemon.token = token
    await cluster.schedule_daemons("ckpt")
    await wait_for(lambda: cluster.api.get(PDBS, GUARD_A, NAMESPACE), what="node-a's guard")
    await wait_for(lambda: cluster.api.get(PDBS, GUARD_B, NAMESPACE), what="node-b's guard")
    return token


def node_status(cluster: Cluster, node: str) -> dict[str, Any] | None:
    status = (cluster.writecache("ckpt") or {}).get("status") or {}
    for entry in status.get("nodes") or []:
        if entry["node"] == node:
            return dict(entry)
    return None


async def test_status_reports_each_node_and_totals(cluster: Cluster) -> None:
    async with running_operator(cluster, operator_settings(cluster)):
        cluster.daemons["node-a"].update(dirty_bytes=3 * 2**20, clean_bytes=2**20,
                                               dirty_files=3, last_flush_time=1767225600.0)
        cluster.daemons["node-b"].update(dirty_bytes=2**20, errors=1, recent_errors=(
            StoreErrorReport(time=1767225600.0, op="PUT step-1/shard-0", error="SlowDown",
                             code="SlowDown"),))
        await deploy(cluster)

        async def totals() -> dict[str, Any] | None:
            status = (cluster.writecache("ckpt") or {}).get("status") or {}
            t = status.get("totals") or {}
            return status if t.get("dirtyBytes") == 4 * 2**20 else None

        status = await wait_for(totals, what="totals from both daemons")
        assert status["dirty"] == "4Mi"
        assert status["readyNodes"] == "2/2"
        a = node_status(cluster, "node-a")
        assert a is not None
        assert (a["phase"], a["dirtyBytes"], a["cachedBytes"], a["dirtyFiles"]) == (
            "Running", 3 * 2**20, 4 * 2**20, 3)
        assert a["lastFlushTime"] == 1767225600.0
        b = node_status(cluster, "node-b")
        assert b is not None
        assert (b["errors"], b["lastError"]) == (1, "PUT step-1/shard-0: SlowDown")
        ready = cluster.condition("ckpt", "Ready")
        assert ready is not None and ready["status"] == "True", ready
        assert (cluster.condition("ckpt", "Draining") or {}).get("status") == "False"

        # A daemon that stops answering makes the cache Degraded, with the node named.
        await cluster.daemons["node-b"].stop()
        degraded = await wait_for(lambda: _condition(cluster, "Degraded", "True"))
        assert degraded["reason"] == "DaemonUnhealthy"
        assert "node-b" in degraded["message"]


async def _condition(cluster: Cluster, kind: str, value: str) -> dict[str, Any] | None:
    cond = cluster.condition("ckpt", kind)
    return cond if cond and cond["status"] == value else None


@pytest.mark.parametrize("namespaces", [None, [NAMESPACE]], ids=["all-namespaces", "namespaced"])
async def test_cordon_drains_and_holds_the_node_until_clean(
        cluster: Cluster, namespaces: list[str] | None) -> None:
    async with running_operator(cluster, operator_settings(cluster), namespaces):
        token = await deploy(cluster)
        daemon_a, daemon_b = cluster.daemons["node-a"], cluster.daemons["node-b"]
        daemon_a.update(dirty_bytes=64 * 2**20)
        guard_pod = await cluster.api.get(PODS, GUARD_A, NAMESPACE)
        assert guard_pod is not None and guard_pod["spec"]["nodeName"] == "node-a"
        pdb = await cluster.api.get(PDBS, GUARD_A, NAMESPACE)
        assert pdb["spec"]["maxUnavailable"] == 0
        assert pdb["spec"]["selector"]["matchLabels"].items() <= \
            guard_pod["metadata"]["labels"].items()

        await cluster.api.patch(NODES, "node-a", {"spec": {"unschedulable": True}})
        await wait_for(lambda: daemon_a.posts("/drain"), what="POST /drain on node-a")
        assert daemon_a.posts("/drain")[0][2] == f"Bearer {token}"
        assert daemon_a.state.state == "draining"
        draining = await wait_for(lambda: _condition(cluster, "Draining", "True"))
        assert draining["reason"] == "NodesDraining" and "node-a" in draining["message"]
        assert await wait_for(lambda: cluster.events("DrainStarted"))

        # While dirty bytes remain, the guard holds the node through several status polls.
        await daemon_a.polled(3)
        assert await cluster.api.get(PDBS, GUARD_A, NAMESPACE) is not None
        assert await cluster.api.get(PODS, GUARD_A, NAMESPACE) is not None
        assert not (node_status(cluster, "node-a") or {}).get("drainOutcome")

        daemon_a.update(dirty_bytes=32 * 2**20)
        await daemon_a.polled(2)
        assert await cluster.api.get(PDBS, GUARD_A, NAMESPACE) is not None

        daemon_a.update(dirty_bytes=0, state="drained")
        await wait_for(lambda: _gone(cluster, PDBS, GUARD_A), what="the guard PDB released")
        assert await cluster.api.get(PODS, GUARD_A, NAMESPACE) is None
        completed = await wait_for(lambda: cluster.events("DrainCompleted"))
        assert "node-a" in completed[0]["message"]
        entry = await wait_for(lambda: _drain_outcome(cluster, "node-a"))
        assert entry["drainOutcome"] == "Drained"
        # The other node is untouched.
        assert not daemon_b.posts("/drain")
        assert await cluster.api.get(PDBS, GUARD_B, NAMESPACE) is not None

        # Uncordoned: the daemon takes writes again and the node is guarded again.
        await cluster.api.patch(NODES, "node-a", {"spec": {"unschedulable": None}})
        await wait_for(lambda: daemon_a.posts("/resume"), what="POST /resume on node-a")
        assert daemon_a.posts("/resume")[0][2] == f"Bearer {token}"
        await wait_for(lambda: cluster.api.get(PDBS, GUARD_A, NAMESPACE), what="guard back")
        assert await wait_for(lambda: cluster.events("DrainCancelled"))
        await wait_for(lambda: "drainOutcome" not in (node_status(cluster, "node-a") or {}),
                       what="node-a's drain record cleared")
        draining = cluster.condition("ckpt", "Draining")
        assert draining is not None and draining["reason"] == "NoDrain"


async def _gone(cluster: Cluster, resource: Any, name: str) -> bool:
    return await cluster.api.get(resource, name, NAMESPACE) is None


async def _drain_outcome(cluster: Cluster, node: str) -> dict[str, Any] | None:
    entry = node_status(cluster, node)
    return entry if entry and entry.get("drainOutcome") else None


async def test_removal_taint_drain_times_out_and_releases(cluster: Cluster) -> None:
    async with running_operator(cluster, operator_settings(cluster)):
        await deploy(cluster, drain_timeout="2s")
        daemon_b = cluster.daemons["node-b"]
        daemon_b.update(dirty_bytes=5 * 2**30)
        await cluster.api.patch(NODES, "node-b", {"spec": {"taints": [
            {"key": "karpenter.sh/disrupted", "effect": "NoSchedule"}]}})
        await wait_for(lambda: daemon_b.posts("/drain"), what="POST /drain on node-b")
        await daemon_b.polled(1)  # the next refresh, well inside the 2 s drain timeout
        assert await cluster.api.get(PDBS, GUARD_B, NAMESPACE) is not None
        await wait_for(lambda: _gone(cluster, PDBS, GUARD_B), timeout=10,
                       what="release after the drain timeout")
        events = await wait_for(lambda: cluster.events("DrainTimedOut"))
        assert events[0]["type"] == "Warning" and "5Gi" in events[0]["message"]
        entry = await wait_for(lambda: _drain_outcome(cluster, "node-b"))
        assert entry["drainOutcome"] == "TimedOut"
        assert "Karpenter" in entry["drainReason"]
        degraded = await wait_for(lambda: _condition(cluster, "Degraded", "True"))
        assert degraded["reason"] == "DrainTimedOut"


async def test_delete_waits_for_every_node_to_flush(cluster: Cluster) -> None:
    async with running_operator(cluster, operator_settings(cluster)):
        await deploy(cluster)
        daemon_a, daemon_b = cluster.daemons["node-a"], cluster.daemons["node-b"]
        daemon_a.update(dirty_bytes=2**20)
        await wait_for(lambda: ((cluster.writecache("ckpt") or {}).get("status") or {})
                       .get("totals", {}).get("dirtyBytes") == 2**20, what="dirty bytes seen")
        await cluster.api.delete(WRITECACHES, "ckpt", NAMESPACE)
        await wait_for(lambda: daemon_a.posts("/drain") and daemon_b.posts("/drain"),
                       what="drain calls to both daemons")
        await daemon_a.polled(2)  # the finalizer looks again and still waits
        wc = cluster.writecache("ckpt")
        assert wc is not None and wc["metadata"].get("deletionTimestamp")
        assert "cistern.dev/finalizer" in wc["metadata"]["finalizers"]
        assert await cluster.api.get(DAEMONSETS, "cistern-ml.ckpt", WORKLOAD) is not None

        daemon_a.update(dirty_bytes=0, state="drained")
        await wait_for(lambda: cluster.writecache("ckpt") is None, what="the WriteCache gone")
        assert await cluster.api.get(DAEMONSETS, "cistern-ml.ckpt", WORKLOAD) is None
        assert cluster.obj("storage.k8s.io/v1/storageclasses", "cistern-ckpt", None) is None
        assert await cluster.api.get(PDBS, GUARD_A, NAMESPACE) is None
        assert await wait_for(lambda: cluster.events("Drained"))


async def test_delete_with_abandon_annotation_skips_the_flush(cluster: Cluster) -> None:
    async with running_operator(cluster, operator_settings(cluster)):
        await deploy(cluster)
        cluster.daemons["node-a"].update(dirty_bytes=7 * 2**20)
        await wait_for(lambda: ((cluster.writecache("ckpt") or {}).get("status") or {})
                       .get("totals", {}).get("dirtyBytes") == 7 * 2**20)
        await cluster.api.patch(WRITECACHES, "ckpt", {"metadata": {"annotations": {
            "cistern.dev/abandon-dirty-data": "true"}}}, NAMESPACE)
        await cluster.api.delete(WRITECACHES, "ckpt", NAMESPACE)
        await wait_for(lambda: cluster.writecache("ckpt") is None, what="the WriteCache gone")
        assert not cluster.daemons["node-a"].posts("/drain")
        events = await wait_for(lambda: cluster.events("DirtyDataAbandoned"))
        assert "7Mi" in events[0]["message"]
        assert await cluster.api.get(DAEMONSETS, "cistern-ml.ckpt", WORKLOAD) is None


async def test_guard_follows_the_daemon_pods(cluster: Cluster) -> None:
    async with running_operator(cluster, operator_settings(cluster)):
        await deploy(cluster)
        # A daemon pod being replaced keeps its guard ...
        await cluster.api.patch(PODS, "cistern-ckpt-node-b", {"metadata": {
            "finalizers": ["test/terminating"]}}, WORKLOAD)
        await cluster.api.delete(PODS, "cistern-ckpt-node-b", WORKLOAD)
        terminating = await cluster.api.get(PODS, "cistern-ckpt-node-b", WORKLOAD)
        assert terminating is not None and terminating["metadata"]["deletionTimestamp"]
        await cluster.daemons["node-a"].polled(3)  # refreshes that see the terminating pod
        assert await cluster.api.get(PDBS, GUARD_B, NAMESPACE) is not None
        # ... a node that no longer runs a daemon (nodeSelector changed) loses it.
        await cluster.api.patch(PODS, "cistern-ckpt-node-b", {"metadata": {"finalizers": []}},
                                WORKLOAD)
        assert await cluster.api.get(PODS, "cistern-ckpt-node-b", WORKLOAD) is None
        await wait_for(lambda: _gone(cluster, PDBS, GUARD_B), what="node-b's guard removed")
        assert await cluster.api.get(PODS, GUARD_B, NAMESPACE) is None
        assert await cluster.api.get(PDBS, GUARD_A, NAMESPACE) is not None


async def test_finalizer_gives_up_with_degraded_and_an_event(cluster: Cluster) -> None:
    """Issue 13: an unreachable or dirty daemon must not hold a deletion for ever."""
    settings = operator_settings(cluster, finalizer_timeout=0.5, finalizer_gave_up_poll=0.5)
    async with running_operator(cluster, settings):
        await deploy(cluster, drain_timeout="1s")
        cluster.daemons["node-a"].update(dirty_bytes=5 * 2**20)
        await cluster.api.delete(WRITECACHES, "ckpt", NAMESPACE)
        degraded = await wait_for(lambda: _condition(cluster, "Degraded", "True"),
                                  what="Degraded after the finalizer timeout")
        assert degraded["reason"] == "FinalizerTimedOut"
        assert "cistern.dev/abandon-dirty-data" in degraded["message"]
        events = await wait_for(lambda: cluster.events("FinalizerTimedOut"))
        assert "cistern.dev/abandon-dirty-data=true" in events[0]["message"]
        # Gave up waiting, not on the data: the cache stays until the annotation says so.
        wc = cluster.writecache("ckpt")
        assert wc is not None and "cistern.dev/finalizer" in wc["metadata"]["finalizers"]
        assert await cluster.api.get(DAEMONSETS, "cistern-ml.ckpt", WORKLOAD) is not None
        await cluster.api.patch(WRITECACHES, "ckpt", {"metadata": {"annotations": {
            "cistern.dev/abandon-dirty-data": "true"}}}, NAMESPACE)
        await wait_for(lambda: cluster.writecache("ckpt") is None, what="the WriteCache gone")
        assert await cluster.api.get(DAEMONSETS, "cistern-ml.ckpt", WORKLOAD) is None

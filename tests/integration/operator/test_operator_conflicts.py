"""Conflicts reported by the daemons become one ``ObjectConflict`` Event per new conflict and
node, and counts in the WriteCache's status (KMock, daemon stand-ins on 127.0.0.x serving a
real ``NodeStatus``)."""

from __future__ import annotations

from typing import Any

import pytest

from cistern.operator.kubeapi import DAEMONSETS, WRITECACHES

from .conftest import NAMESPACE, WORKLOAD, Cluster, operator_settings, running_operator, wait_for

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(90)]

FIRST = "run1/step-100/rank-0.pt -> run1/step-100/rank-0.pt.cistern-conflict-20261129T091500Z"
LATEST = "run1/step-200/rank-3.pt -> run1/step-200/rank-3.pt.cistern-conflict-20261129T092000Z"


def entry(cluster: Cluster, node: str) -> dict[str, Any]:
    """The node's status entry (KeyError until there is one: ``wait_for`` waits on)."""
    status = (cluster.writecache("ckpt") or {}).get("status") or {}
    return {n["node"]: dict(n) for n in status.get("nodes") or []}[node]


def totals(cluster: Cluster) -> dict[str, Any]:
    return dict(((cluster.writecache("ckpt") or {}).get("status") or {}).get("totals") or {})


async def test_each_new_conflict_is_announced_once_and_counted(cluster: Cluster) -> None:
    a, b = cluster.daemons["node-a"], cluster.daemons["node-b"]
    async with running_operator(cluster, operator_settings(cluster)):
        await cluster.api.create(WRITECACHES, {
            "apiVersion": "cistern.dev/v1alpha1", "kind": "WriteCache",
            "metadata": {"name": "ckpt", "namespace": NAMESPACE},
            "spec": {"objectStore": {"bucket": "training-ckpt", "prefix": "run1"}}}, NAMESPACE)
        await wait_for(lambda: cluster.api.get(DAEMONSETS, "cistern-ml.ckpt", WORKLOAD),
                       what="the DaemonSet")
        await cluster.schedule_daemons("ckpt")
        await wait_for(lambda: entry(cluster, "node-b")["conflictsTotal"] == 0,
                       what="conflict counts in the status")
        assert totals(cluster)["conflicts"] == 0
        assert cluster.events("ObjectConflict") == []

        a.update(conflicts_total=1, last_conflict=FIRST)
        await wait_for(lambda: cluster.events("ObjectConflict"), what="the first conflict Event")
        [event] = cluster.events("ObjectConflict")
        assert event["type"] == "Warning"
        assert event["involvedObject"]["name"] == "ckpt"
        assert "node node-a" in event["message"]
        assert "run1/step-100/rank-0.pt keeps the other writer's object" in event["message"]
        assert "kept as run1/step-100/rank-0.pt.cistern-conflict-20261129T091500Z" \
            in event["message"]
        assert entry(cluster, "node-a")["lastConflict"] == FIRST

        # Reconciles that see the same count announce nothing more.
        await a.polled(3)
        assert len(cluster.events("ObjectConflict")) == 1

        # Two more on node-a between two reads: one Event saying two, naming the latest.
        a.update(conflicts_total=3, last_conflict=LATEST)
        await wait_for(lambda: len(cluster.events("ObjectConflict")) == 2,
                       what="the second conflict Event")
        second = [e for e in cluster.events("ObjectConflict") if "step-200" in e["message"]]
        assert len(second) == 1 and "2 upload(s) refused" in second[0]["message"]
        await wait_for(lambda: totals(cluster)["conflicts"] == 3, what="conflicts in totals")

        # An unreachable daemon keeps its count; answering again announces nothing old.
        await a.stop()
        await wait_for(lambda: entry(cluster, "node-a")["phase"] == "Unreachable",
                       what="node-a unreachable")
        assert entry(cluster, "node-a")["conflictsTotal"] == 3
        await a.start()
        await a.polled(3)
        assert entry(cluster, "node-a")["phase"] == "Running"
        assert len(cluster.events("ObjectConflict")) == 2

        # The daemon restarted in the same pod (its counter starts again): a new conflict
        # counts from zero; the other node has announced nothing.
        a.update(conflicts_total=1, last_conflict=FIRST)
        await wait_for(lambda: len(cluster.events("ObjectConflict")) == 3,
                       what="the conflict after the restart")
        assert not [e for e in cluster.events("ObjectConflict") if "node-b" in e["message"]]
        assert b.polls() > 0

"""Pure operator logic: merge patches, node disruption, status conditions."""

from __future__ import annotations

from typing import Any

from cistern.nodestatus import NodeStatus, PeersStatus
from cistern.operator.conflicts import NewConflicts, track_conflicts
from cistern.operator.disruption import disruption_reason
from cistern.operator.patches import contains, merge_patch
from cistern.operator.status import (
    ClusterView,
    SpecProblem,
    build_conditions,
    human_bytes,
    node_summary,
    totals,
)


def test_contains_ignores_server_defaults_but_not_changes() -> None:
    current = {"spec": {"a": 1, "default": "x", "list": [{"n": 1, "d": 2}]}, "status": {}}
    assert contains(current, {"spec": {"a": 1, "list": [{"n": 1}]}})
    assert not contains(current, {"spec": {"a": 2}})
    assert not contains(current, {"spec": {"list": [{"n": 1}, {"n": 2}]}})
    assert not contains(current, {"spec": {"missing": None}})
    assert not contains({"v": True}, {"v": 1})
    assert contains({"v": 1.0}, {"v": 1})


def test_merge_patch_is_empty_when_nothing_changed() -> None:
    desired = {"metadata": {"labels": {"a": "1"}}, "data": {"k": "v"}}
    current = {"metadata": {"labels": {"a": "1"}, "uid": "u"}, "data": {"k": "v"}}
    assert merge_patch(current, desired, desired) == {}


def test_merge_patch_changes_and_removes_what_was_applied_before() -> None:
    previous = {"spec": {"nodeSelector": {"gpu": "true", "zone": "a"}, "x": 1}}
    desired = {"spec": {"nodeSelector": {"gpu": "true"}, "x": 2}}
    current = {"spec": {"nodeSelector": {"gpu": "true", "zone": "a"}, "x": 1, "server": 5}}
    assert merge_patch(current, desired, previous) == {
        "spec": {"nodeSelector": {"zone": None}, "x": 2}}


def test_disruption_reasons() -> None:
    assert disruption_reason({"spec": {}}) is None
    assert "cordoned" in (disruption_reason({"spec": {"unschedulable": True}}) or "")
    assert "cluster-autoscaler" in (disruption_reason({"spec": {"taints": [
        {"key": "ToBeDeletedByClusterAutoscaler", "effect": "NoSchedule"}]}}) or "")
    assert "Karpenter" in (disruption_reason({"spec": {"taints": [
        {"key": "karpenter.sh/disrupted", "effect": "NoSchedule"}]}}) or "")
    # A soft hint is not a removal.
    assert disruption_reason({"spec": {"taints": [
        {"key": "DeletionCandidateOfClusterAutoscaler", "effect": "PreferNoSchedule"}]}}) is None


def test_human_bytes() -> None:
    assert [human_bytes(v) for v in (0, 1023, 1536, 10 * 2**20, 150 * 2**30)] == [
        "0", "1023", "1.5Ki", "10Mi", "150Gi"]


def daemonset(desired: int, ready: int, updated: int, stale: bool = False) -> dict[str, Any]:
    return {"metadata": {"generation": 3 if stale else 2},
            "status": {"desiredNumberScheduled": desired, "numberReady": ready,
                       "updatedNumberScheduled": updated, "observedGeneration": 2}}


def by_type(conditions: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in conditions}


def test_healthy_cache_conditions() -> None:
    nodes = [node_summary("n1", "p1", NodeStatus(state="running", dirty_bytes=10,
                                                 clean_bytes=5))]
    c = by_type(build_conditions(ClusterView(2, None, daemonset(1, 1, 1), nodes), now="t0"))
    assert [c[k]["status"] for k in ("Ready", "Progressing", "Degraded", "FlushBacklog",
                                     "Draining")] == ["True", "False", "False", "False", "False"]
    assert c["Ready"]["reason"] == "AllNodesReady"
    assert all(cond["observedGeneration"] == 2 for cond in c.values())


def test_a_node_reports_its_peer_copies_and_why_not_rdma() -> None:
    peers = PeersStatus(node="n1", transport="tcp", transport_reason="fallback to TCP: no RDMA "
                        "device", bytes_held_for_peers=4096, copies_missing_total=2,
                        suspects=("n3",))
    status = NodeStatus.from_json(NodeStatus(state="running", peers=peers).to_json())
    assert status.peers == peers
    entry = node_summary("n1", "p1", status)
    assert (entry["peerTransport"], entry["bytesHeldForPeers"], entry["peerCopiesMissing"],
            entry["peerSuspects"]) == ("tcp", 4096, 2, ["n3"])
    assert "no RDMA device" in entry["peerTransportReason"]
    assert "peerTransport" not in node_summary("n2", "p2", NodeStatus(state="running"))


def test_rollout_backlog_drain_and_unreachable() -> None:
    nodes = [
        node_summary("n1", "p1", NodeStatus(state="draining", dirty_bytes=60, capacity_bytes=100),
                     drain={"drainStartedAt": "t", "drainReason": "the node is cordoned"}),
        node_summary("n2", "p2", None, error="connection refused"),
    ]
    c = by_type(build_conditions(ClusterView(2, None, daemonset(2, 1, 1, stale=True), nodes)))
    assert (c["Ready"]["status"], c["Ready"]["reason"]) == ("False", "NodesNotReady")
    assert "n2" in c["Ready"]["message"]
    assert c["Progressing"]["reason"] == "RollingOut"
    assert c["Degraded"]["reason"] == "DaemonUnhealthy" and "n2" in c["Degraded"]["message"]
    assert c["FlushBacklog"]["status"] == "True" and "n1" in c["FlushBacklog"]["message"]
    assert c["Draining"]["status"] == "True" and "cordoned" in c["Draining"]["message"]
    assert totals(nodes) == {"nodes": 2, "dirtyBytes": 60, "cachedBytes": 60, "errors": 0,
                            "conflicts": 0}


def test_spec_problem_is_degraded_and_transition_times_are_kept() -> None:
    view = ClusterView(3, SpecProblem("SecretNotFound", "Secret ml/x does not exist"),
                       daemonset(1, 1, 1), [])
    first = build_conditions(view, now="t1")
    assert by_type(first)["Degraded"]["reason"] == "SecretNotFound"
    assert "previous configuration keeps running" in by_type(first)["Degraded"]["message"]
    again = by_type(build_conditions(view, previous=first, now="t2"))
    assert again["Degraded"]["lastTransitionTime"] == "t1"
    fixed = by_type(build_conditions(ClusterView(3, None, daemonset(1, 1, 1), []),
                                     previous=first, now="t3"))
    assert fixed["Degraded"]["status"] == "False"
    assert fixed["Degraded"]["lastTransitionTime"] == "t3"


def test_no_nodes_and_not_deployed() -> None:
    assert by_type(build_conditions(ClusterView(1, None, daemonset(0, 0, 0), [])))["Ready"][
        "reason"] == "NoNodes"
    assert by_type(build_conditions(ClusterView(1, None, None, [])))["Ready"][
        "reason"] == "NotDeployed"


def test_conflicts_are_new_past_the_count_written_for_the_same_pod() -> None:
    latest = "run1/a.pt -> run1/a.pt.cistern-conflict-20261129T091500Z"
    status = NodeStatus(state="running", conflicts_total=3, last_conflict=latest)
    fields, new = track_conflicts("n1", "p1", status, {"pod": "p1", "conflictsTotal": 1})
    assert fields == {"conflictsTotal": 3, "lastConflict": latest}
    assert new is not None and (new.count, new.total) == (2, 3)
    assert "kept as run1/a.pt.cistern-conflict-20261129T091500Z" in new.message()
    assert track_conflicts("n1", "p1", status, {"pod": "p1", "conflictsTotal": 3})[1] is None
    # A new pod, or a counter that went down (restart in the same pod), counts from zero.
    assert track_conflicts("n1", "p2", status, {"pod": "p1", "conflictsTotal": 3})[1] == \
        track_conflicts("n1", "p1", status, {"pod": "p1", "conflictsTotal": 9})[1] == NewConflicts(
            node="n1", count=3, total=3, latest=latest)
    # Unreachable: the written fields stay (same pod only), nothing is announced.
    kept = {"pod": "p1", "conflictsTotal": 3, "lastConflict": latest, "errors": 0}
    assert track_conflicts("n1", "p1", None, kept) == (
        {"conflictsTotal": 3, "lastConflict": latest}, None)
    assert track_conflicts("n1", "p2", None, kept) == ({}, None)

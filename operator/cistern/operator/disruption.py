"""When is a node on its way out? Pure checks on a Node object."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["REMOVAL_TAINTS", "disruption_reason"]

#: Taints that announce a node's removal, by who sets them.
REMOVAL_TAINTS: dict[str, str] = {
    "ToBeDeletedByClusterAutoscaler": "cluster-autoscaler is removing the node",
    "karpenter.sh/disrupted": "Karpenter is disrupting the node",
    "karpenter.sh/disruption": "Karpenter is disrupting the node",
    "node.kubernetes.io/unschedulable": "the node is cordoned",
    "node.cloudprovider.kubernetes.io/shutdown": "the node is shutting down",
}


def disruption_reason(node: Mapping[str, Any]) -> str | None:
    """Why the node is being emptied, or None if it is not (a cordon counts)."""
    spec = node.get("spec") or {}
    for taint in spec.get("taints") or []:
        key = taint.get("key")
        if key in REMOVAL_TAINTS and taint.get("effect") in ("NoSchedule", "NoExecute"):
            return f"{REMOVAL_TAINTS[key]} (taint {key})"
    if spec.get("unschedulable"):
        return "the node is cordoned (unschedulable)"
    return None

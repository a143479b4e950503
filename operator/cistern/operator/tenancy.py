"""What a tenant's WriteCache may ask for: where its daemons run and who may share it. Pure.

A WriteCache lives in a tenant's namespace, but its daemons are privileged and run in the
operator's namespace on the nodes its ``nodeSelector`` picks. The platform team bounds that
choice (chart values): the node label keys a selector may use, and never the control plane
(neither a selector nor a toleration aimed at it). ``spec.access`` names the namespaces that may
use the cache; its label selector is matched here against the cluster's namespaces.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from cistern.writecache import WriteCacheSpec

__all__ = ["CONTROL_PLANE_LABELS", "PlacementError", "check_placement", "selected_namespaces",
           "selector_matches"]

#: Node labels (and taint keys) that mark control-plane nodes.
CONTROL_PLANE_LABELS = ("node-role.kubernetes.io/control-plane", "node-role.kubernetes.io/master")


class PlacementError(ValueError):
    """A nodeSelector or toleration the platform team does not allow."""


def check_placement(spec: WriteCacheSpec, allowed_keys: Iterable[str] | None,
                    forbid_control_plane: bool) -> None:
    """Raise PlacementError naming the field when the spec's placement is not allowed."""
    keys = set(spec.node_selector)
    if forbid_control_plane:
        aimed = sorted(keys & set(CONTROL_PLANE_LABELS))
        if aimed:
            raise PlacementError(f"spec.nodeSelector: {', '.join(aimed)} selects control-plane "
                                 "nodes; cache daemons may not run there")
        for i, toleration in enumerate(spec.tolerations):
            key = str(toleration.get("key") or "")
            if not key and toleration.get("operator") == "Exists":
                raise PlacementError(f"spec.tolerations[{i}]: tolerating every taint would let "
                                     "cache daemons onto control-plane nodes; name the taint")
            if key in CONTROL_PLANE_LABELS:
                raise PlacementError(f"spec.tolerations[{i}]: {key} is the control-plane taint; "
                                     "cache daemons may not run there")
    if allowed_keys is not None:
        allowed = set(allowed_keys)
        refused = sorted(keys - allowed)
        if refused:
            raise PlacementError(f"spec.nodeSelector: key(s) {', '.join(refused)} are not "
                                 f"allowed here; allowed: {', '.join(sorted(allowed)) or 'none'}")


def selector_matches(labels: Mapping[str, str], selector: Mapping[str, Any]) -> bool:
    """A Kubernetes label selector (``matchLabels``, ``matchExpressions``) against labels.

    An empty selector matches everything, as in Kubernetes; an unknown operator matches
    nothing (refusing is the safe answer for access control).
    """
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions") or []:
        key = expression.get("key", "")
        operator = expression.get("operator")
        values = set(expression.get("values") or [])
        if operator == "In":
            ok = key in labels and labels[key] in values
        elif operator == "NotIn":
            ok = key not in labels or labels[key] not in values
        elif operator == "Exists":
            ok = key in labels
        elif operator == "DoesNotExist":
            ok = key not in labels
        else:
            return False
        if not ok:
            return False
    return True


def selected_namespaces(namespaces: Iterable[Mapping[str, Any]],
                        selector: Mapping[str, Any] | None) -> list[str]:
    """Names of the Namespace objects the selector matches; none without a selector."""
    if selector is None:
        return []
    return sorted(ns["metadata"]["name"] for ns in namespaces
                  if selector_matches((ns.get("metadata") or {}).get("labels") or {}, selector))

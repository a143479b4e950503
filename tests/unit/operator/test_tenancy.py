"""What a tenant's WriteCache may ask for (issue 13): placement limits and shared access."""

from __future__ import annotations

from typing import Any

import pytest

from cistern.operator.tenancy import (
    PlacementError,
    check_placement,
    selected_namespaces,
    selector_matches,
)
from cistern.writecache import WriteCacheSpec


def spec(**fields: Any) -> WriteCacheSpec:
    return WriteCacheSpec.from_dict({"objectStore": {"bucket": "b-ckpt"}, **fields})


@pytest.mark.parametrize("fields, allowed, message", [
    ({"nodeSelector": {"node-role.kubernetes.io/control-plane": ""}}, None, "control-plane"),
    ({"nodeSelector": {"node-role.kubernetes.io/master": "true"}}, None, "control-plane"),
    ({"tolerations": [{"operator": "Exists"}]}, None, "every taint"),
    ({"tolerations": [{"key": "node-role.kubernetes.io/control-plane",
                       "operator": "Exists", "effect": "NoSchedule"}]}, None, "control-plane"),
    ({"nodeSelector": {"kubernetes.io/hostname": "etcd-1"}}, ("cistern.dev/cache",),
     "kubernetes.io/hostname"),
])
def test_forbidden_placement(fields: dict[str, Any], allowed: tuple[str, ...] | None,
                             message: str) -> None:
    with pytest.raises(PlacementError, match=message):
        check_placement(spec(**fields), allowed, forbid_control_plane=True)


def test_allowed_placement() -> None:
    fine = spec(nodeSelector={"cistern.dev/cache": "nvme"},
                tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists"}])
    check_placement(fine, ("cistern.dev/cache",), forbid_control_plane=True)
    check_placement(fine, None, forbid_control_plane=True)
    check_placement(spec(tolerations=[{"operator": "Exists"}]), None,
                    forbid_control_plane=False)


def test_label_selectors() -> None:
    labels = {"team": "ml", "tier": "prod"}
    assert selector_matches(labels, {})
    assert selector_matches(labels, {"matchLabels": {"team": "ml"}})
    assert not selector_matches(labels, {"matchLabels": {"team": "web"}})
    assert selector_matches(labels, {"matchExpressions": [
        {"key": "tier", "operator": "In", "values": ["prod", "staging"]},
        {"key": "legacy", "operator": "DoesNotExist"}]})
    assert not selector_matches(labels, {"matchExpressions": [
        {"key": "tier", "operator": "NotIn", "values": ["prod"]}]})
    assert not selector_matches(labels, {"matchExpressions": [
        {"key": "tier", "operator": "Gt", "values": ["1"]}]})  # unknown: refuse
    namespaces = [{"metadata": {"name": "a", "labels": {"team": "ml"}}},
                  {"metadata": {"name": "b"}}]
    assert selected_namespaces(namespaces, {"matchLabels": {"team": "ml"}}) == ["a"]
    assert selected_namespaces(namespaces, None) == []

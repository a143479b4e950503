"""The node label the operator keeps is the CSI node plugin's topology key, and the selector
match decides where it belongs."""

from __future__ import annotations

from cistern.csi.settings import topology_key
from cistern.operator.manifests import node_matches, topology_label


def test_label_is_the_csi_topology_key() -> None:
    assert topology_label("checkpoints") == "csi.cistern.dev/checkpoints"
    assert topology_label("checkpoints") == topology_key("checkpoints")


def test_node_matches_the_selector() -> None:
    node = {"metadata": {"name": "gpu-1", "labels": {"nvme": "true", "zone": "a"}}}
    assert node_matches(node, {})
    assert node_matches(node, {"nvme": "true"})
    assert node_matches(node, {"nvme": "true", "zone": "a"})
    assert not node_matches(node, {"nvme": "false"})
    assert not node_matches(node, {"gpu": "true"})
    assert not node_matches({"metadata": {"name": "bare"}}, {"nvme": "true"})
    assert node_matches({"metadata": {"name": "bare"}}, {})

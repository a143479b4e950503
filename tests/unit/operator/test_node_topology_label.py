"""The node label the operator keeps is the CSI node plugin's topology key, and the selector
match decides where it belongs."""

from __future__ import annotations

from cistern.csi.settings import topology_key
from cistern.operator.manifests import node_matches, topology_label
from cistern.writecache import cache_key


def test_label_is_the_csi_topology_key() -> None:
    assert topology_label("checkpoints", "ml") == "csi.cistern.dev/ml.checkpoints"
    assert topology_label("checkpoints", "ml") == topology_key(cache_key("ml", "checkpoints"))
    # Same name, two namespaces: two labels (deleting one never strips the other).
    assert topology_label("checkpoints", "team-a") != topology_label("checkpoints", "team-b")
    long = topology_label("c" * 63, "n" * 63)
    assert len(long.split("/", 1)[1]) <= 63  # a valid label name


def test_node_matches_the_selector() -> None:
    node = {"metadata": {"name": "gpu-1", "labels": {"nvme": "true", "zone": "a"}}}
    assert node_matches(node, {})
    assert node_matches(node, {"nvme": "true"})
    assert node_matches(node, {"nvme": "true", "zone": "a"})
    assert not node_matches(node, {"nvme": "false"})
    assert not node_matches(node, {"gpu": "true"})
    assert not node_matches({"metadata": {"name": "bare"}}, {"nvme": "true"})
    assert node_matches({"metadata": {"name": "bare"}}, {})

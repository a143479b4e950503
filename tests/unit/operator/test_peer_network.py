"""Issue 17, the operator's half: spec.durability / spec.peers are validated, rendered into the
node config and the DaemonSet, and the token Secret / members ConfigMap are valid objects that
the node side reads as it is."""

from __future__ import annotations

import copy
import json
import pathlib
from typing import Any

import kubernetes_validate
import pytest
import yaml

from cistern.cachenode.cli import _build_config, _parser
from cistern.cachenode.peers.membership import parse_members
from cistern.config import ConfigError, NodeConfig
from cistern.operator import manifests
from cistern.operator.daemons import DaemonEndpoint
from cistern.operator.peernet import members_configmap, port_problem, token_secret
from cistern.operator.settings import OperatorSettings
from cistern.operator.status import ClusterView, build_conditions
from cistern.peerconfig import DurabilityPolicy, PeersConfig
from cistern.writecache import WriteCacheSpec

SETTINGS = OperatorSettings(workload_namespace="cistern-system")
BODY: dict[str, Any] = {
    "apiVersion": "cistern.dev/v1alpha1", "kind": "WriteCache",
    "metadata": {"name": "ckpt", "namespace": "ml", "uid": "0c0ffee0-0000-0000-0000-000000000002"},
    "spec": {"objectStore": {"bucket": "ckpt-bucket"},
             "durability": {"level": "local", "peerTimeout": "3s", "onShortfall": "fail",
                            "paths": [{"pattern": "ckpt/*", "level": "peers", "peers": 2}]},
             "peers": {"port": 7070}},
}


def body(**spec: Any) -> dict[str, Any]:
    out = copy.deepcopy(BODY)
    out["spec"].update(spec)
    return out


def rendered(b: dict[str, Any]) -> tuple[WriteCacheSpec, NodeConfig, dict[str, Any]]:
    spec = WriteCacheSpec.from_dict(b["spec"])
    config = manifests.node_config("ckpt", "ml", spec, SETTINGS)
    return spec, config, manifests.daemonset(b, spec, config, SETTINGS)


def test_a_path_rule_with_peers_renders_the_peer_network() -> None:
    spec, config, ds = rendered(BODY)
    # What the daemon reads back from the ConfigMap is what the spec said.
    back = NodeConfig.from_dict(yaml.safe_load(
        manifests.configmap(BODY, config, SETTINGS)["data"]["node.yaml"]))
    assert back.durability == spec.durability
    assert back.durability.for_key("ckpt/step-1/shard") == ("peers", 2)
    assert back.durability.on_shortfall == "fail" and back.durability.peer_timeout == 3.0
    assert back.peers.listen == "0.0.0.0:7070"  # the pod's own network namespace: its IP
    assert back.peers.members_file == f"{manifests.PEERS_DIR}/members.json"
    assert back.peers.token_file == f"{manifests.PEER_TOKEN_DIR}/token"

    container = ds["spec"]["template"]["spec"]["containers"][0]
    assert container["command"][-2:] == ["--peer-node-name", "$(NODE_NAME)"]
    assert {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}} \
        in container["env"]
    assert {"name": "peers", "containerPort": 7070, "protocol": "TCP"} in container["ports"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in ds["spec"]["template"]["spec"]["volumes"]}
    n = manifests.names("ckpt", "ml")
    assert mounts["peer-token"] == manifests.PEER_TOKEN_DIR
    assert volumes["peer-token"]["secret"] == {"secretName": n.peer_token, "defaultMode": 0o400}
    assert mounts["peer-members"] == manifests.PEERS_DIR
    # A plain ConfigMap volume (no subPath): the kubelet updates it in place.
    assert volumes["peer-members"]["configMap"] == {"name": n.peer_members}
    kubernetes_validate.validate(ds, "1.32.0", strict=True)


def test_without_peers_nothing_of_the_peer_network_is_rendered() -> None:
    for durability in ({}, {"level": "s3"}, {"level": "local", "paths": [
            {"pattern": "x/*", "level": "s3"}]}):
        spec, config, ds = rendered(body(durability=durability))
        assert config.peers.listen is None and not config.durability.uses_peers
        container = ds["spec"]["template"]["spec"]["containers"][0]
        assert "--peer-node-name" not in container["command"]
        assert [p["name"] for p in container["ports"]] == ["control"]
        assert not any(v["name"].startswith("peer") for v in
                       ds["spec"]["template"]["spec"]["volumes"])
        # The defaults, as before issue 17: an operator upgrade rolls no daemon of such a cache.
        assert config.to_dict()["peers"] == PeersConfig().to_dict()
    assert rendered(body(durability={}))[1].to_dict()["durability"] == \
        DurabilityPolicy().to_dict()


@pytest.mark.parametrize("spec, needle", [
    ({"durability": {"level": "many"}}, "spec.durability.level"),
    ({"durability": {"level": "peers", "peers": 0}}, "spec.durability.peers"),
    ({"durability": {"paths": [{"pattern": "a/*"}]}}, "spec.durability.paths[0].level"),
    ({"durability": {"peerTimeout": "soon"}}, "spec.durability.peerTimeout"),
    ({"durability": {"onShortfall": "panic"}}, "spec.durability.onShortfall"),
    ({"durability": {"copies": 2}}, "spec.durability: unknown"),
    ({"peers": {"port": 80}}, "spec.peers.port"),
    ({"peers": {"transport": "udp"}}, "spec.peers.transport"),
    ({"peers": {"listen": "0.0.0.0:1"}}, "spec.peers: unknown"),
])
def test_invalid_durability_is_refused_with_the_field(spec: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        WriteCacheSpec.from_dict({**BODY["spec"], **spec})


def test_peer_port_must_not_collide() -> None:
    peers = {"durability": {"level": "peers"}}
    spec = WriteCacheSpec.from_dict({**BODY["spec"], **peers, "peers": {"port": 9464}})
    assert "control port" in (port_problem(spec, OperatorSettings(control_port=9464)) or "")
    spec = WriteCacheSpec.from_dict({**BODY["spec"], **peers, "peers": {"port": 9480},
                                     "s3Endpoint": {"enabled": True, "port": 9480,
                                                    "credentialsSecretRef": {"name": "k"}}})
    assert "s3Endpoint.port" in (port_problem(spec, SETTINGS) or "")
    spec = WriteCacheSpec.from_dict({**BODY["spec"], "durability": {}, "peers": {"port": 9464}})
    assert port_problem(spec, OperatorSettings(control_port=9464)) is None  # not used


def test_members_configmap_is_what_the_node_parses() -> None:
    endpoints = [DaemonEndpoint(node="node-b", pod="p2", host="10.0.0.7", port=9464, ready=False),
                 DaemonEndpoint(node="node-a", pod="p1", host="10.0.0.5", port=9464),
                 # a replaced pod that still has an IP: the node's ready pod is the member
                 DaemonEndpoint(node="node-a", pod="p0", host="10.0.0.4", port=9464,
                                ready=False)]
    cm = members_configmap(BODY, endpoints, 7070, SETTINGS)
    kubernetes_validate.validate(cm, "1.32.0", strict=True)
    assert cm["metadata"]["namespace"] == "cistern-system"
    members = parse_members(cm["data"]["members.json"])
    assert [(m.node, m.host, m.port) for m in members] == [
        ("node-a", "10.0.0.5", 7070), ("node-b", "10.0.0.7", 7070)]
    # Stable text: the same pods in another order do not rewrite the ConfigMap.
    assert members_configmap(BODY, endpoints[::-1], 7070, SETTINGS) == cm
    assert parse_members(members_configmap(BODY, [], 7070, SETTINGS)["data"]["members.json"]) \
        == []


def test_token_secret_is_valid_and_in_the_workload_namespace() -> None:
    secret = token_secret(BODY, "x" * 43, SETTINGS)
    kubernetes_validate.validate(secret, "1.32.0", strict=True)
    assert secret["metadata"]["namespace"] == "cistern-system"
    assert secret["metadata"]["name"] == manifests.names("ckpt", "ml").peer_token
    assert "ownerReferences" not in secret["metadata"]  # cross-namespace: the finalizer deletes


def test_peer_node_name_flag_sets_the_name_among_the_members(tmp_path: pathlib.Path) -> None:
    _, config, _ = rendered(BODY)
    path = tmp_path / "node.yaml"
    data = config.to_dict()
    data["mount"], data["cache"]["dir"] = str(tmp_path / "mnt"), str(tmp_path / "cache")
    path.write_text(yaml.safe_dump(data))
    args = _parser().parse_args(["run", "--config", str(path), "--mount", str(tmp_path / "m"),
                                 "--peer-node-name", "ip-10-0-0-5.internal"])
    built = _build_config(args)
    assert built.peers.node_name == "ip-10-0-0-5.internal"
    assert built.peers.listen == "0.0.0.0:7070"  # the rest of the section is kept


def _node(name: str, **fields: Any) -> dict[str, Any]:
    return {"node": name, "phase": "Running", "dirtyBytes": 0, **fields}


def test_peer_copies_condition() -> None:
    reason = "fallback to TCP: no RDMA device"
    plain = build_conditions(ClusterView(generation=1, nodes=[_node("a")]))
    assert "PeerCopies" not in [c["type"] for c in plain]  # no peer network, no condition
    fine = build_conditions(ClusterView(generation=1, nodes=[
        _node("a", peerTransport="tcp", peerTransportReason=reason, peerCopiesMissing=0,
              bytesHeldForPeers=2048),
        _node("b", peerTransport="tcp", peerTransportReason=reason, peerCopiesMissing=0)]))
    cond = fine[-1]
    assert (cond["type"], cond["status"], cond["reason"]) == ("PeerCopies", "True", "CopiesMade")
    assert "2Ki held" in cond["message"] and f"a, b: {reason}" in cond["message"]
    missing = build_conditions(ClusterView(generation=1, nodes=[
        _node("a", peerTransport="tcp", peerTransportReason="tcp requested",
              peerCopiesMissing=3),
        _node("b", peerTransport="tcp", peerTransportReason="tcp requested")]), fine, "t2")
    cond = missing[-1]
    assert (cond["status"], cond["reason"], cond["lastTransitionTime"]) == (
        "False", "CopiesMissing", "t2")
    assert cond["message"].startswith("a: 3 fsync(s)") and "b:" not in cond["message"]
    assert json.dumps(missing)  # plain JSON for the status patch

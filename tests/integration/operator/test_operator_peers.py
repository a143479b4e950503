"""Issue 17 against KMock: ``spec.durability: {level: peers}`` yields the peer token Secret, the
members ConfigMap kept current from the daemon pods, the rendered node config and mounts, the
PeerCopies condition; turned off or deleted, the objects go; a colliding port is refused."""

from __future__ import annotations

import base64
import json
import logging
from typing import Any

import pytest
import yaml

from cistern.config import NodeConfig
from cistern.nodestatus import PeersStatus
from cistern.operator import manifests
from cistern.operator.kubeapi import CONFIGMAPS, DAEMONSETS, PODS, SECRETS, WRITECACHES

from .conftest import NAMESPACE, WORKLOAD, Cluster, operator_settings, running_operator, wait_for

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(90)]

N = manifests.names("ckpt", NAMESPACE)
PEERS = {"level": "peers", "peers": 1}


def writecache(durability: dict[str, Any], port: int = 9471) -> dict[str, Any]:
    return {"apiVersion": "cistern.dev/v1alpha1", "kind": "WriteCache",
            "metadata": {"name": "ckpt", "namespace": NAMESPACE},
            "spec": {"objectStore": {"bucket": "training-ckpt"}, "drain": {"timeout": "1m"},
                     "durability": durability, "peers": {"port": port}}}


async def members(cluster: Cluster) -> list[tuple[str, str, int]] | None:
    cm = await cluster.api.get(CONFIGMAPS, N.peer_members, WORKLOAD)
    if cm is None:
        return None
    return [(m["node"], m["host"], m["port"])
            for m in json.loads(cm["data"]["members.json"])["members"]]


async def test_peer_network_objects_follow_the_spec_and_the_pods(
        cluster: Cluster, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with running_operator(cluster, operator_settings(cluster)):
        await cluster.api.create(WRITECACHES, writecache(PEERS), NAMESPACE)
        ds = await wait_for(lambda: cluster.api.get(DAEMONSETS, N.daemonset, WORKLOAD),
                            what="the DaemonSet")
        # The token: random, in the operator's namespace only, mounted into the daemons.
        secret = await cluster.api.get(SECRETS, N.peer_token, WORKLOAD)
        assert secret is not None
        token = base64.b64decode(secret["data"]["token"]).decode()
        assert len(token) >= 43  # 32 random bytes, URL-safe
        assert await cluster.api.get(SECRETS, N.peer_token, NAMESPACE) is None
        pod = ds["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["peer-token"]["secret"]["secretName"] == N.peer_token
        assert volumes["peer-members"]["configMap"]["name"] == N.peer_members
        assert pod["containers"][0]["command"][-2:] == ["--peer-node-name", "$(NODE_NAME)"]
        # The node config asks for the peer network, on the files the pod mounts.
        cm = await cluster.api.get(CONFIGMAPS, N.configmap, WORKLOAD)
        assert cm is not None
        config = NodeConfig.from_dict(yaml.safe_load(cm["data"]["node.yaml"]))
        assert config.durability.for_key("step-1/shard-0") == ("peers", 1)
        assert config.peers.listen == "0.0.0.0:9471"
        assert config.peers.members_file == f"{manifests.PEERS_DIR}/members.json"
        assert config.peers.token_file == f"{manifests.PEER_TOKEN_DIR}/token"
        assert await members(cluster) == []  # made before the pods, so they can start

        # The daemon pods appear: their IPs and the peer port are published.
        await cluster.schedule_daemons("ckpt")
        a, b = cluster.daemons["node-a"], cluster.daemons["node-b"]
        want = [("node-a", a.host, 9471), ("node-b", b.host, 9471)]
        await wait_for(lambda: _equal(members(cluster), want), what="both daemons published")

        # The nodes' peer fields reach the status, and the PeerCopies condition.
        reason = "fallback to TCP: no RDMA device"
        for daemon, missing in ((a, 0), (b, 2)):
            daemon.update(peers=PeersStatus(node=daemon.node, port=9471, transport="tcp",
                                            transport_reason=reason,
                                            copies_missing_total=missing))
        cond = await wait_for(lambda: _peer_condition(cluster, "False"), what="PeerCopies")
        assert cond["reason"] == "CopiesMissing" and cond["message"].startswith("node-b: 2")
        b.update(peers=PeersStatus(node="node-b", port=9471, transport="tcp",
                                   transport_reason=reason))
        await wait_for(lambda: _peer_condition(cluster, "True"), what="PeerCopies True")

        # A daemon pod goes away: it leaves the members list.
        await cluster.api.delete(PODS, "cistern-ckpt-node-b", WORKLOAD)
        await wait_for(lambda: _equal(members(cluster), want[:1]), what="node-b left")

        # A refused spec (the peer port on the control port) leaves the running daemons' list.
        await cluster.api.patch(WRITECACHES, "ckpt", {"spec": {"peers": {
            "port": cluster.control_port}}}, NAMESPACE)
        await wait_for(lambda: (cluster.condition("ckpt", "Degraded") or {}).get("reason")
                       == "InvalidSpec", what="the port refused")
        await a.polled(3)
        assert await members(cluster) == want[:1]
        await cluster.api.patch(WRITECACHES, "ckpt", {"spec": {"peers": {"port": 9471}}},
                                NAMESPACE)
        await wait_for(lambda: (cluster.condition("ckpt", "Degraded") or {}).get("status")
                       == "False", what="the port accepted again")

        # The token is never in the status, an Event or a log line.
        assert token not in json.dumps(cluster.writecache("ckpt"))
        events = [dict(obj.raw) for (res, _, _), obj in cluster.kmock.objects.items()
                  if res.plural == "events"]
        assert events and not [e for e in events if token in json.dumps(e)]
        assert not [r for r in caplog.records if token in r.getMessage()]

        # Level local again: no peer network, no objects.
        await cluster.api.patch(WRITECACHES, "ckpt", {"spec": {"durability": {
            "level": "local"}}}, NAMESPACE)

        async def off() -> bool:
            ds = await cluster.api.get(DAEMONSETS, N.daemonset, WORKLOAD)
            return ds is not None and "--peer-node-name" not in \
                ds["spec"]["template"]["spec"]["containers"][0]["command"] and \
                await cluster.api.get(SECRETS, N.peer_token, WORKLOAD) is None and \
                await members(cluster) is None

        await wait_for(off, what="the peer network removed")

        # On again, then the WriteCache deleted: the finalizer removes both.
        await cluster.api.patch(WRITECACHES, "ckpt", {"spec": {"durability": PEERS}}, NAMESPACE)
        await wait_for(lambda: cluster.api.get(SECRETS, N.peer_token, WORKLOAD),
                       what="a token again")
        await cluster.api.delete(WRITECACHES, "ckpt", NAMESPACE)

        async def gone() -> bool:
            return await cluster.api.get(SECRETS, N.peer_token, WORKLOAD) is None and \
                await members(cluster) is None and \
                await cluster.api.get(DAEMONSETS, N.daemonset, WORKLOAD) is None

        await wait_for(gone, what="the cache's objects removed")


async def _equal(value: Any, want: Any) -> bool:
    return await value == want


def _peer_condition(cluster: Cluster, status: str) -> dict[str, Any] | None:
    cond = cluster.condition("ckpt", "PeerCopies")
    return cond if cond and cond["status"] == status else None


@pytest.mark.parametrize("durability, port, needle", [
    ({"level": "peers"}, "CONTROL", "spec.peers.port: "),
    ({"level": "sometimes"}, 9471, "spec.durability.level"),
    ({"level": "peers", "peers": 0}, 9471, "spec.durability.peers"),
])
async def test_bad_peer_spec_is_refused_with_a_reason(
        cluster: Cluster, durability: dict[str, Any], port: Any, needle: str) -> None:
    port = cluster.control_port if port == "CONTROL" else port
    async with running_operator(cluster, operator_settings(cluster)):
        await cluster.api.create(WRITECACHES, writecache(durability, port), NAMESPACE)

        def degraded() -> dict[str, Any] | None:
            cond = cluster.condition("ckpt", "Degraded")
            return cond if cond and cond["status"] == "True" else None

        cond = await wait_for(degraded, what="Degraded")
        assert cond["reason"] == "InvalidSpec" and needle in cond["message"], cond
        assert await cluster.api.get(DAEMONSETS, N.daemonset, WORKLOAD) is None
        assert await cluster.api.get(SECRETS, N.peer_token, WORKLOAD) is None
        assert await members(cluster) is None

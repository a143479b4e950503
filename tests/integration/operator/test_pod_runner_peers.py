"""Issue 17 end to end on one machine, two pod-runner nodes (marked ``e2e_local``).

The chart's operator (a pod on node-1) gets a WriteCache with ``durability: {level: peers,
peers: 1}``; the runner starts the cache daemon on both nodes from the operator's DaemonSet as
written (token Secret and members ConfigMap mounted, ``--peer-node-name $(NODE_NAME)``, the
pod IP from the runner). The operator publishes both pods' addresses, the daemons find each
other (``GET /status``: each lists the other member), and an fsync through node-1's mount
leaves a copy on node-2 — which needs the shared token — seen in the WriteCache's status.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import tempfile
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest_asyncio
import yaml

from cistern.operator.manifests import LABEL_ROLE
from support.kubelet import ApiClient, Node, helm_template
from support.s3server import MotoServer

from .pod_runner_harness import (
    BUCKET,
    E2E_MARKS,
    MANAGED,
    NAMESPACE,
    apply_chart,
    example_writecache,
    serve_resources,
    unmount_below,
    until,
    write_synced,
)

# The journey's marks: e2e_local, a time limit, root and /dev/fuse, the entry points.
pytestmark = E2E_MARKS

NODES = ("node-1", "node-2")


class TwoNodes:
    def __init__(self, api: ApiClient, nodes: dict[str, Node], chart: list[dict[str, Any]],
                 s3: MotoServer) -> None:
        self.api, self.nodes, self.chart, self.s3 = api, nodes, chart, s3

    def describe(self) -> str:
        wcs = self.api.list("writecaches")
        return "\n".join(f"== {name}\n{node.describe()}" for name, node in self.nodes.items()) \
            + "\nwritecaches: " + yaml.safe_dump([w.get("status") for w in wcs])[:3000]

    def daemon(self, node: str) -> Any:
        pods = self.nodes[node].pods_with({**MANAGED, LABEL_ROLE: "cache-node"})
        return pods[0] if len(pods) == 1 and pods[0].ready else None


@pytest_asyncio.fixture()
async def two_nodes(kmock: Any, tmp_path: Path) -> AsyncIterator[TwoNodes]:
    serve_resources(kmock)
    values = {"operator": {"statusInterval": 1, "logFormat": "plain"},
              "holder": {"enabled": False}}
    chart = await asyncio.to_thread(helm_template, values, tmp_path)
    api = ApiClient(str(kmock.url))
    roots = {name: Path(tempfile.mkdtemp(prefix=f"peers-{name}-", dir="/tmp")) for name in NODES}
    nodes = {name: Node(api, name, roots[name], time_scale=0.1) for name in NODES}
    with MotoServer() as s3:
        await asyncio.to_thread(s3.client().create_bucket, Bucket=BUCKET)
        for node in nodes.values():
            await asyncio.to_thread(node.start)
        try:
            yield TwoNodes(api, nodes, chart, s3)
        finally:
            for node in nodes.values():
                await asyncio.to_thread(node.stop)
            unmount_below(*roots.values())
            for root in roots.values():
                shutil.rmtree(root, ignore_errors=True)


def node_status(daemon: Any) -> dict[str, Any]:
    """The daemon's own ``GET /status`` on its pod IP (the control port from its config)."""
    control = yaml.safe_load(config_path(daemon).read_text())["control"]
    with urllib.request.urlopen(f"http://{control}/status", timeout=5) as response:
        return dict(json.load(response))


def config_path(daemon: Any) -> Path:
    argv = next(iter(daemon.containers.values())).plan.argv
    return Path(argv[argv.index("--config") + 1])  # as the runner translated it


async def test_two_daemons_find_each_other_and_hold_copies(two_nodes: TwoNodes) -> None:
    h = two_nodes
    # Only the operator, pinned to node-1 (each runner node would start a Deployment's pod).
    operator = [d for d in h.chart if d["kind"] == "Deployment"]
    for doc in operator:
        doc["spec"]["template"]["spec"]["nodeSelector"] = {"kubernetes.io/hostname": NODES[0]}
    await asyncio.to_thread(apply_chart, h.api, operator)
    wc, secret = example_writecache(h.s3.endpoint)
    wc["spec"]["flush"] = {"uploadDelay": "1h"}  # the copy stays held: the data stays dirty
    wc["spec"]["durability"] = {"level": "peers", "peers": 1, "peerTimeout": "5s"}
    await asyncio.to_thread(h.api.create, "secrets", secret, NAMESPACE)
    await asyncio.to_thread(h.api.create, "writecaches", wc, NAMESPACE)
    name = wc["metadata"]["name"]

    daemons = {}
    for node in NODES:
        daemons[node] = await until(lambda node=node: h.daemon(node), 90,
                                    f"the cache daemon ready on {node}", h.describe)
    # Each daemon lists the other as a member once the operator published both pod IPs.
    for node, other in (NODES, NODES[::-1]):
        await until(lambda node=node, other=other: other in (
            node_status(daemons[node]).get("peers") or {}).get("members", []), 60,
            f"{node} lists {other}", h.describe)
    peers = node_status(daemons[NODES[0]])["peers"]
    assert peers["node"] == NODES[0] and "fallback to TCP" in peers["transport_reason"]

    # An fsync on node-1 is acknowledged by node-2 (authenticated with the shared token).
    mount = Path(yaml.safe_load(config_path(daemons[NODES[0]]).read_text())["mount"])
    payload = os.urandom(2 * 2**20)
    await asyncio.to_thread(write_synced, mount / "step-1" / "shard-0.bin", payload)
    held = await until(lambda: (node_status(daemons[NODES[1]])["peers"]
                                .get("bytes_held_for_peers") or 0) >= len(payload), 30,
                       "node-2 holds the copy", h.describe)
    assert held
    assert node_status(daemons[NODES[0]])["peers"]["copies_missing_total"] == 0

    def peer_copies() -> dict[str, Any] | None:
        wc_now = h.api.get("writecaches", name, NAMESPACE) or {}
        nodes = {n["node"]: n for n in (wc_now.get("status") or {}).get("nodes") or []}
        cond = next((c for c in (wc_now.get("status") or {}).get("conditions") or []
                     if c["type"] == "PeerCopies"), None)
        if cond and cond["status"] == "True" and \
                (nodes.get(NODES[1]) or {}).get("bytesHeldForPeers", 0) >= len(payload):
            return cond
        return None

    cond = await until(peer_copies, 30, "PeerCopies True with node-2's copy", h.describe)
    assert cond["reason"] == "CopiesMade"

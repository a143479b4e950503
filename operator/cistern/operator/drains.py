"""Node drains and their guards: a cordoned or disrupted node's daemon flushes its dirty data
while a PodDisruptionBudget-protected guard pod holds the node's eviction, until the data is in
the object store or the drain timeout passes; an uncordoned node's daemon takes writes again."""

from __future__ import annotations

import datetime
import logging
from collections.abc import Mapping
from typing import Any

from cistern.nodestatus import NodeStatus
from cistern.operator import manifests
from cistern.operator.daemons import DaemonClient, DaemonEndpoint, DaemonError
from cistern.operator.disruption import disruption_reason
from cistern.operator.fleet import Fleet
from cistern.operator.kubeapi import PDBS, PODS, KubeApi
from cistern.operator.problems import EventSink
from cistern.operator.settings import OperatorSettings
from cistern.operator.status import human_bytes, now_iso, parse_time

__all__ = ["Drains"]

logger = logging.getLogger(__name__)


class Drains:
    def __init__(self, api: KubeApi, daemons: DaemonClient, fleet: Fleet,
                 settings: OperatorSettings, post_event: EventSink) -> None:
        self.api = api
        self.daemons = daemons
        self.fleet = fleet
        self.settings = settings
        self.post_event = post_event

    async def advance(self, body: Mapping[str, Any], endpoint: DaemonEndpoint,
                      node: Mapping[str, Any] | None, daemon_status: NodeStatus | None,
                      previous: Mapping[str, Any], timeout: float) -> dict[str, Any]:
        """One step of a node's drain; returns the drain fields of its status entry."""
        meta = body["metadata"]
        name, namespace = meta["name"], meta["namespace"]
        reason = disruption_reason(node) if node is not None else "the node object is gone"
        if reason is None:
            if not meta.get("deletionTimestamp"):
                await self.ensure_guard(body, endpoint.node)
            # The node came back (uncordoned): writes again.
            if daemon_status is not None and daemon_status.draining:
                try:
                    await self.daemons.resume(endpoint, await self.fleet.control_token(namespace,
                                                                                        name))
                except DaemonError as exc:
                    logger.warning("WriteCache %s/%s: resume failed on node %s: %s",
                                   namespace, name, endpoint.node, exc)
                else:
                    self.post_event(body, "Normal", "DrainCancelled",
                                    f"node {endpoint.node} is schedulable again; the cache "
                                    "accepts writes again")
            return {}
        started = previous.get("drainStartedAt")
        outcome = previous.get("drainOutcome")
        fields: dict[str, Any] = {"drainReason": reason, "drainStartedAt": started or now_iso(),
                                  "drainOutcome": outcome}
        if outcome:
            return fields
        if daemon_status is not None and not daemon_status.draining:
            try:
                await self.fleet.drain_daemon(endpoint, namespace, name)
            except DaemonError as exc:
                logger.warning("WriteCache %s/%s: drain call failed on node %s: %s",
                               namespace, name, endpoint.node, exc)
        if not started:
            self.post_event(body, "Normal", "DrainStarted",
                            f"node {endpoint.node}: {reason}; flushing "
                            f"{human_bytes(daemon_status.dirty_bytes if daemon_status else 0)} "
                            "before releasing the node")
        dirty = None if daemon_status is None else daemon_status.dirty_bytes
        uploading = 0 if daemon_status is None else daemon_status.uploading_files
        elapsed = (datetime.datetime.now(datetime.UTC)
                   - parse_time(fields["drainStartedAt"])).total_seconds()
        if dirty == 0 and uploading == 0:
            await self.release_guard(body, endpoint.node)
            fields["drainOutcome"] = "Drained"
            fields["drainFinishedAt"] = now_iso()
            self.post_event(body, "Normal", "DrainCompleted",
                            f"node {endpoint.node}: all data is in the object store; "
                            f"released the node after {elapsed:.0f}s")
        elif elapsed >= timeout:
            await self.release_guard(body, endpoint.node)
            fields["drainOutcome"] = "TimedOut"
            fields["drainFinishedAt"] = now_iso()
            left = "unknown (daemon unreachable)" if dirty is None else human_bytes(dirty)
            self.post_event(body, "Warning", "DrainTimedOut",
                            f"node {endpoint.node}: drain timeout {timeout:.0f}s reached with "
                            f"{left} not yet in the object store; released the node")
        return fields

    async def ensure_guard(self, body: Mapping[str, Any], node: str) -> None:
        await self.api.apply(PDBS, manifests.guard_pdb(body, node))
        await self.api.apply(PODS, manifests.guard_pod(body, node, self.settings))

    async def release_guard(self, body: Mapping[str, Any], node: str) -> None:
        """Delete the PDB first: from then on the guard pod may be evicted with the node."""
        namespace = body["metadata"]["namespace"]
        guard = manifests.guard_name(body["metadata"]["name"], node)
        await self.api.delete(PDBS, guard, namespace)
        await self.api.delete(PODS, guard, namespace)
        logger.info("WriteCache %s/%s: released the drain guard of node %s",
                    namespace, body["metadata"]["name"], node)

    async def remove_stale_guards(self, body: Mapping[str, Any], running: set[str]) -> None:
        meta = body["metadata"]
        selector = {manifests.LABEL_WRITECACHE: meta["name"],
                    manifests.LABEL_ROLE: "drain-guard"}
        for pod in await self.api.list(PODS, meta["namespace"], label_selector=selector):
            node = pod["metadata"].get("annotations", {}).get("cistern.dev/node-name")
            if node not in running:
                await self.release_guard(body, node or pod["spec"].get("nodeName", ""))

    async def drain_node(self, node: Mapping[str, Any], namespaces: list[str] | None) -> int:
        """Ask every cache daemon on a disrupted node to drain now (the timer tracks it)."""
        if disruption_reason(node) is None:
            return 0
        node_name = node["metadata"]["name"]
        calls = 0
        scopes: list[str | None] = list(namespaces) if namespaces else [None]
        for namespace in scopes:
            for endpoint in await self.fleet.endpoints(namespace):
                if endpoint.node != node_name:
                    continue
                try:
                    status = await self.daemons.status(endpoint)
                    if not status.draining:
                        await self.fleet.drain_daemon(endpoint, endpoint.namespace,
                                                      endpoint.writecache)
                        calls += 1
                except DaemonError as exc:
                    logger.warning("Node %s: could not start the drain of %s/%s: %s", node_name,
                                   endpoint.namespace, endpoint.writecache, exc)
        return calls

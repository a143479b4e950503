"""Deleting a WriteCache: every node drains first (unless the abandon annotation says not to),
then the daemons, guards, copies, StorageClass and node labels are removed."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from cistern.operator import manifests
from cistern.operator.bodies import drain_timeout
from cistern.operator.daemons import DaemonClient, DaemonError
from cistern.operator.fleet import Fleet
from cistern.operator.kubeapi import CONFIGMAPS, DAEMONSETS, PDBS, PODS, SECRETS, KubeApi
from cistern.operator.mirrors import Mirrors
from cistern.operator.nodelabels import NodeLabels
from cistern.operator.problems import EventSink, Problem
from cistern.operator.s3endpoint import S3EndpointObjects
from cistern.operator.settings import OperatorSettings
from cistern.operator.status import human_bytes
from cistern.operator.statuswriter import StatusWriter
from cistern.operator.storageclasses import StorageClasses

__all__ = ["ABANDON_ANNOTATION", "Finalizer"]

logger = logging.getLogger(__name__)

ABANDON_ANNOTATION = "cistern.dev/abandon-dirty-data"


class Finalizer:
    def __init__(self, api: KubeApi, daemons: DaemonClient, settings: OperatorSettings,
                 post_event: EventSink, *, fleet: Fleet, status: StatusWriter,
                 mirrors: Mirrors, s3_endpoint: S3EndpointObjects,
                 storage_classes: StorageClasses, node_labels: NodeLabels) -> None:
        self.api = api
        self.daemons = daemons
        self.settings = settings
        self.post_event = post_event
        self.fleet = fleet
        self.status = status
        self.mirrors = mirrors
        self.s3_endpoint = s3_endpoint
        self.storage_classes = storage_classes
        self.node_labels = node_labels

    async def finalize(self, body: Mapping[str, Any], waited: float) -> str | None:
        """Drain every node, then remove the daemons and the StorageClass.

        Returns None when done, else a message saying what is still being waited for.
        """
        meta = body["metadata"]
        name, namespace = meta["name"], meta["namespace"]
        abandon = str((meta.get("annotations") or {}).get(ABANDON_ANNOTATION, "")).lower() \
            in ("true", "yes", "1")
        if abandon:
            dirty = int(((body.get("status") or {}).get("totals") or {}).get("dirtyBytes") or 0)
            self.post_event(body, "Warning", "DirtyDataAbandoned",
                            f"{ABANDON_ANNOTATION} is set: removing the cache without flushing "
                            f"(last reported dirty: {human_bytes(dirty)})")
        else:
            observed = await self.fleet.observe(namespace, name)
            token = await self.fleet.control_token(namespace, name)
            waiting = []
            for endpoint in observed.endpoints:
                daemon_status = observed.statuses.get(endpoint.node)
                if daemon_status is None:
                    waiting.append(f"{endpoint.node}: unreachable "
                                   f"({observed.errors.get(endpoint.node)})")
                    continue
                if not daemon_status.draining:
                    try:
                        await self.daemons.drain(endpoint, token)
                    except DaemonError as exc:
                        waiting.append(f"{endpoint.node}: {exc}")
                        continue
                dirty = daemon_status.dirty_bytes
                uploading = daemon_status.uploading_files
                if dirty or uploading:
                    waiting.append(f"{endpoint.node}: {human_bytes(dirty)} dirty")
            if waiting:
                message = ("waiting for the nodes to flush before deletion: "
                           + "; ".join(waiting))
                timeout = drain_timeout(body)
                if waited >= timeout:
                    message += (f" (past the drain timeout of {timeout:.0f}s; annotate "
                                f"{ABANDON_ANNOTATION}=true to delete without flushing)")
                deadline = self.deadline(body)
                if waited >= deadline:
                    # Give up waiting (polled slowly from now on), loudly, keeping the data.
                    await self.status.report_problem(body, Problem(
                        "FinalizerTimedOut", f"deletion gave up after {deadline:.0f}s waiting "
                        f"for the nodes to flush (unreachable or dirty daemons); the cache "
                        f"daemons and their data stay; annotate {ABANDON_ANNOTATION}=true to "
                        f"delete without flushing", temporary=True))
                return message
            if observed.endpoints:
                self.post_event(body, "Normal", "Drained",
                                f"all {len(observed.endpoints)} node(s) flushed; removing the "
                                "cache daemons")
        await self.cleanup(body)
        return None

    def deadline(self, body: Mapping[str, Any]) -> float:
        """Seconds after which a deletion stops waiting: the (bounded) drain timeout plus the
        finalizer timeout."""
        return min(drain_timeout(body), self.settings.max_drain_timeout) + \
            self.settings.finalizer_timeout

    async def cleanup(self, body: Mapping[str, Any]) -> None:
        meta = body["metadata"]
        name, namespace = meta["name"], meta["namespace"]
        n = manifests.names(name, namespace)
        workload = self.settings.workload_namespace
        await self.api.delete(DAEMONSETS, n.daemonset, workload)
        guards = {manifests.LABEL_WRITECACHE: name, manifests.LABEL_ROLE: "drain-guard"}
        for obj in await self.api.list(PDBS, namespace, label_selector=guards):
            await self.api.delete(PDBS, obj["metadata"]["name"], namespace)
        for obj in await self.api.list(PODS, namespace, label_selector=guards):
            await self.api.delete(PODS, obj["metadata"]["name"], namespace)
        await self.api.delete(CONFIGMAPS, n.configmap, workload)
        await self.api.delete(SECRETS, n.secret, workload)
        await self.api.delete(SECRETS, n.credentials, workload)
        await self.api.delete(SECRETS, n.peer_token, workload)  # issue 17 (peernet)
        await self.api.delete(CONFIGMAPS, n.peer_members, workload)
        await self.s3_endpoint.remove(body)
        await self.mirrors.remove_access(n.key)
        await self.storage_classes.delete(body, keep=None)
        await self.node_labels.remove(name, namespace)
        logger.info("WriteCache %s/%s: removed its daemons, StorageClass and node labels",
                    namespace, name)

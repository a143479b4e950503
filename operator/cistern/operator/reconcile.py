"""The reconciler: WriteCache -> owned objects, status from the daemons, drain guards, cleanup.

Handlers (``handlers.py``) are thin: they call these methods and translate ``Problem`` into
``kopf.TemporaryError`` / ``kopf.PermanentError``. Everything here decides "already done" by
reading the cluster, so any step may be repeated.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import logging
import secrets
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from cistern.config import ConfigError, DrainPolicy
from cistern.nodestatus import NodeStatus
from cistern.operator import manifests
from cistern.operator.bucketprobe import BucketProblem, probe_bucket
from cistern.operator.daemons import DaemonClient, DaemonEndpoint, DaemonError
from cistern.operator.disruption import disruption_reason
from cistern.operator.kubeapi import (
    CONFIGMAPS,
    DAEMONSETS,
    NODES,
    PDBS,
    PODS,
    SECRETS,
    STORAGECLASSES,
    WRITECACHES,
    ApiError,
    KubeApi,
)
from cistern.operator.mirrors import Mirrors
from cistern.operator.s3endpoint import S3EndpointObjects, endpoint_url, missing_keys
from cistern.operator.settings import OperatorSettings
from cistern.operator.status import (
    ClusterView,
    SpecProblem,
    build_conditions,
    human_bytes,
    node_summary,
    totals,
)
from cistern.operator.tenancy import PlacementError, check_placement
from cistern.writecache import WriteCacheSpec, storage_class_name

__all__ = ["ABANDON_ANNOTATION", "EventSink", "Problem", "Reconciler"]

logger = logging.getLogger(__name__)

ABANDON_ANNOTATION = "cistern.dev/abandon-dirty-data"
#: Daemon states in which a drain is already under way.

#: ``(body, type, reason, message)`` -> posts a Kubernetes Event about ``body``.
EventSink = Callable[[Mapping[str, Any], str, str, str], None]


class Problem(Exception):
    """A reason the latest spec cannot be rolled out now; ``temporary`` if retrying can help."""

    def __init__(self, reason: str, message: str, temporary: bool, delay: float = 30.0) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.temporary = temporary
        self.delay = delay


@dataclass(frozen=True)
class Observed:
    """The daemons of one WriteCache and what they said."""

    endpoints: list[DaemonEndpoint]
    statuses: dict[str, NodeStatus | None]
    errors: dict[str, str]


def now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_time(value: str) -> datetime.datetime:
    return datetime.datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC)


def _decode_secret(secret: Mapping[str, Any]) -> dict[str, str]:
    data = {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}
    return data


class Reconciler:
    def __init__(self, api: KubeApi, daemons: DaemonClient, settings: OperatorSettings,
                 post_event: EventSink) -> None:
        self.api = api
        self.daemons = daemons
        self.settings = settings
        self.post_event = post_event
        self.mirrors = Mirrors(api, settings)
        self.s3_endpoint = S3EndpointObjects(api, settings)

    # ---------------------------------------------------------------- spec -> objects

    async def validate(self, body: Mapping[str, Any]) -> WriteCacheSpec:
        """Parse the spec and check what it refers to; raise ``Problem`` with a reason."""
        meta = body["metadata"]
        try:
            spec = WriteCacheSpec.from_dict(body.get("spec") or {})
            manifests.node_config(meta["name"], meta["namespace"], spec, self.settings)
        except ConfigError as exc:
            raise Problem("InvalidSpec", str(exc), temporary=False) from None
        try:
            check_placement(spec, self.settings.allowed_node_selector_keys,
                            self.settings.forbid_control_plane)
        except PlacementError as exc:
            raise Problem("PlacementForbidden", str(exc), temporary=False) from None
        if spec.drain.timeout > self.settings.max_drain_timeout:
            raise Problem("DrainTimeoutTooLong", f"spec.drain.timeout: {spec.drain.timeout:.0f}s "
                          f"is more than this cluster allows "
                          f"({self.settings.max_drain_timeout:.0f}s, chart value "
                          "drain.maxTimeout)", temporary=False)
        secret_name = spec.object_store.credentials_secret
        if secret_name:
            secret = await self.api.get(SECRETS, secret_name, meta["namespace"])
            if secret is None:
                raise Problem("SecretNotFound", f"Secret {meta['namespace']}/{secret_name} "
                              "(spec.objectStore.credentialsSecretRef) does not exist",
                              temporary=True, delay=self.settings.retry_delay)
            values = _decode_secret(secret)
            missing = [k for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
                       if not values.get(k)]
            if missing:
                raise Problem("SecretInvalid", f"Secret {meta['namespace']}/{secret_name} "
                              f"lacks {', '.join(missing)}", temporary=True,
                              delay=self.settings.retry_delay)
            if self.settings.check_object_store:
                try:
                    await probe_bucket(spec.object_store, values, self.settings.http_timeout)
                except BucketProblem as exc:
                    raise Problem(exc.reason, exc.message, temporary=True,
                                  delay=self.settings.retry_delay) from None
        await self._validate_s3_endpoint(meta["namespace"], spec)
        return spec

    async def _validate_s3_endpoint(self, namespace: str, spec: WriteCacheSpec) -> None:
        endpoint = spec.s3_endpoint
        if not endpoint.enabled:
            return
        if endpoint.port == self.settings.control_port:
            raise Problem("InvalidSpec", f"spec.s3Endpoint.port: {endpoint.port} is the cache "
                          "daemons' control port; choose another", temporary=False)
        secret = await self.api.get(SECRETS, endpoint.credentials_secret or "", namespace)
        if secret is None:
            raise Problem("SecretNotFound", f"Secret {namespace}/{endpoint.credentials_secret} "
                          "(spec.s3Endpoint.credentialsSecretRef) does not exist",
                          temporary=True, delay=self.settings.retry_delay)
        missing = missing_keys(secret)
        if missing:
            raise Problem("SecretInvalid", f"Secret {namespace}/{endpoint.credentials_secret} "
                          f"(spec.s3Endpoint.credentialsSecretRef) lacks {', '.join(missing)}",
                          temporary=True, delay=self.settings.retry_delay)

    async def apply(self, body: Mapping[str, Any], spec: WriteCacheSpec) -> dict[str, str]:
        """Create or update every owned object; returns ``{kind: created|patched|unchanged}``."""
        meta = body["metadata"]
        name, namespace = meta["name"], meta["namespace"]
        workload = self.settings.workload_namespace
        config = manifests.node_config(name, namespace, spec, self.settings)
        names = manifests.names(name, namespace)
        results: dict[str, str] = {}
        if await self.api.get(SECRETS, names.secret, workload) is None:
            await self.api.create(SECRETS, manifests.control_secret(
                body, secrets.token_urlsafe(32), self.settings), workload)
            results["Secret"] = "created"
        copied = await self.mirrors.credentials(body, spec)
        if copied != "unchanged":
            results["Credentials"] = copied
        access = await self.mirrors.access(body, spec)
        if access != "unchanged":
            results["AccessPolicy"] = access
        results["ConfigMap"] = await self.api.apply(
            CONFIGMAPS, manifests.configmap(body, config, self.settings))
        results["DaemonSet"] = await self.api.apply(
            DAEMONSETS, manifests.daemonset(body, spec, config, self.settings))
        results["StorageClass"] = await self._apply_storage_class(body, spec)
        results.update({k: v for k, v in (await self.s3_endpoint.sync(body, spec)).items()
                        if spec.s3_endpoint.enabled or v != "unchanged"})
        changed = {k: v for k, v in results.items() if v != "unchanged"}
        if changed:
            logger.info("WriteCache %s/%s: %s", namespace, name,
                        ", ".join(f"{k} {v}" for k, v in changed.items()))
        return results

    async def _apply_storage_class(self, body: Mapping[str, Any], spec: WriteCacheSpec) -> str:
        """StorageClass parameters and reclaim policy are immutable: replace it if they change."""
        desired = manifests.storage_class(body, spec)
        await self._delete_storage_classes(body, keep=desired["metadata"]["name"])
        current = await self.api.get(STORAGECLASSES, desired["metadata"]["name"])
        if current is not None:
            owner = current.get("metadata", {}).get("labels", {})
            if owner.get(manifests.LABEL_WRITECACHE) != body["metadata"]["name"] or owner.get(
                    "cistern.dev/writecache-namespace") != body["metadata"]["namespace"]:
                raise Problem("StorageClassConflict", f"StorageClass "
                              f"{desired['metadata']['name']} exists and belongs to someone "
                              "else; set spec.csi.storageClassName", temporary=True,
                              delay=self.settings.retry_delay)
            immutable = ("provisioner", "parameters", "reclaimPolicy", "volumeBindingMode")
            if any(current.get(k) != desired.get(k) for k in immutable):
                await self.api.delete(STORAGECLASSES, desired["metadata"]["name"])
                await self.api.create(STORAGECLASSES, desired)
                return "replaced"
        return await self.api.apply(STORAGECLASSES, desired)

    async def _delete_storage_classes(self, body: Mapping[str, Any], keep: str | None) -> None:
        meta = body["metadata"]
        for sc in await self.api.list(STORAGECLASSES, label_selector={
                manifests.LABEL_WRITECACHE: meta["name"],
                "cistern.dev/writecache-namespace": meta["namespace"]}):
            if sc["metadata"]["name"] != keep:
                await self.api.delete(STORAGECLASSES, sc["metadata"]["name"])

    async def patch_status(self, body: Mapping[str, Any], fields: Mapping[str, Any]) -> None:
        """Merge ``fields`` into the status, only if the object is still the version read.

        Status is written from handlers and from the timer; the resourceVersion precondition
        (409 on mismatch) keeps a writer working from an old read from undoing a newer one.
        """
        meta = body["metadata"]
        patch: dict[str, Any] = {"status": dict(fields)}
        if meta.get("resourceVersion"):
            patch["metadata"] = {"resourceVersion": meta["resourceVersion"]}
        await self.api.patch(WRITECACHES, meta["name"], patch, meta["namespace"],
                             subresource="status")

    async def _fresh(self, body: Mapping[str, Any]) -> dict[str, Any] | None:
        meta = body["metadata"]
        return await self.api.get(WRITECACHES, meta["name"], meta["namespace"])

    async def _update_status(self, body: Mapping[str, Any],
                             compute: Callable[[Mapping[str, Any]], Awaitable[dict[str, Any]]],
                             attempts: int = 5) -> dict[str, Any] | None:
        """Read the latest object, compute the status from it, write it; retry on conflicts.

        Returns the fields written, or None when the object is gone.
        """
        for attempt in range(attempts):
            fresh = await self._fresh(body)
            if fresh is None:
                return None
            fields = await compute(fresh)
            if not fields:
                return fields
            try:
                await self.patch_status(fresh, fields)
            except ApiError as exc:
                if exc.status != 409 or attempt == attempts - 1:
                    raise
                continue
            return fields
        return None

    async def report_applied(self, body: Mapping[str, Any], spec: WriteCacheSpec) -> None:
        meta = body["metadata"]
        ds = await self.api.get(DAEMONSETS, manifests.names(
            meta["name"], meta["namespace"]).daemonset, self.settings.workload_namespace)

        async def compute(fresh: Mapping[str, Any]) -> dict[str, Any]:
            status = fresh.get("status") or {}
            generation = int(body["metadata"].get("generation") or 0)
            view = ClusterView(generation=generation, daemonset=ds,
                               nodes=status.get("nodes") or [])
            return {
                "observedGeneration": generation,
                "specProblem": None,
                "storageClassName": storage_class_name(meta["name"], spec),
                "s3Endpoint": endpoint_url(body, spec, self.settings),
                "conditions": build_conditions(view, status.get("conditions") or [], now_iso()),
            }

        await self._update_status(body, compute)

    async def report_problem(self, body: Mapping[str, Any], problem: Problem) -> None:
        """Degraded with the reason; nothing owned is touched, so a working cache keeps working."""
        meta = body["metadata"]
        ds = await self.api.get(DAEMONSETS, manifests.names(
            meta["name"], meta["namespace"]).daemonset, self.settings.workload_namespace)
        old: dict[str, Any] = {}

        async def compute(fresh: Mapping[str, Any]) -> dict[str, Any]:
            status = fresh.get("status") or {}
            old.update(status.get("specProblem") or {})
            view = ClusterView(generation=int(body["metadata"].get("generation") or 0),
                               spec_problem=SpecProblem(problem.reason, problem.message),
                               daemonset=ds, nodes=status.get("nodes") or [])
            return {
                "specProblem": {"reason": problem.reason, "message": problem.message},
                "conditions": build_conditions(view, status.get("conditions") or [], now_iso()),
            }

        await self._update_status(body, compute)
        if old.get("reason") != problem.reason or old.get("message") != problem.message:
            self.post_event(body, "Warning", problem.reason, problem.message)

    # ---------------------------------------------------------------- daemons

    async def endpoints(self, namespace: str | None = None,
                        name: str | None = None) -> list[DaemonEndpoint]:
        """The daemon pods (in the workload namespace) of WriteCache ``namespace/name``, or of
        every WriteCache when both are None."""
        selector = {manifests.LABEL_ROLE: "cache-node"}
        if name:
            selector[manifests.LABEL_WRITECACHE] = name
        if namespace:
            selector[manifests.LABEL_NAMESPACE] = namespace
        result = []
        for pod in await self.api.list(PODS, self.settings.workload_namespace,
                                       label_selector=selector):
            node = (pod.get("spec") or {}).get("nodeName")
            ip = (pod.get("status") or {}).get("podIP")
            if node and ip and not pod["metadata"].get("deletionTimestamp"):
                conditions = (pod.get("status") or {}).get("conditions") or []
                ready = any(c.get("type") == "Ready" and c.get("status") == "True"
                            for c in conditions)
                result.append(DaemonEndpoint(
                    node=node, pod=pod["metadata"]["name"], host=ip,
                    port=self.settings.control_port, ready=ready,
                    namespace=pod["metadata"].get("labels", {}).get(
                        manifests.LABEL_NAMESPACE, namespace or ""),
                    writecache=pod["metadata"].get("labels", {}).get(
                        manifests.LABEL_WRITECACHE, "")))
        return sorted(result, key=lambda e: e.node)

    async def daemon_nodes(self, namespace: str, name: str) -> set[str]:
        """Nodes with a daemon pod of this WriteCache in any phase."""
        pods = await self.api.list(PODS, self.settings.workload_namespace,
                                   label_selector=manifests.workload_selector(
                                       name, namespace, "cache-node"))
        return {node for pod in pods if (node := (pod.get("spec") or {}).get("nodeName"))}

    async def control_token(self, namespace: str, name: str) -> str | None:
        secret = await self.api.get(SECRETS, manifests.names(name, namespace).secret,
                                    self.settings.workload_namespace)
        return None if secret is None else _decode_secret(secret).get("token")

    async def observe(self, namespace: str, name: str) -> Observed:
        endpoints = await self.endpoints(namespace, name)
        answers = await asyncio.gather(*(self.daemons.status(e) for e in endpoints),
                                       return_exceptions=True)
        statuses: dict[str, NodeStatus | None] = {}
        errors: dict[str, str] = {}
        for endpoint, answer in zip(endpoints, answers, strict=True):
            if isinstance(answer, DaemonError):
                statuses[endpoint.node] = None
                errors[endpoint.node] = str(answer)
            elif isinstance(answer, BaseException):
                raise answer
            else:
                statuses[endpoint.node] = answer
        return Observed(endpoints, statuses, errors)

    async def drain_daemon(self, endpoint: DaemonEndpoint, namespace: str, name: str) -> None:
        token = await self.control_token(namespace, name)
        await self.daemons.drain(endpoint, token)

    # ---------------------------------------------------------------- timer: status + drains

    async def refresh(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """Poll the daemons, advance node drains, keep guards, and update the status.

        Works from a fresh read of the WriteCache and writes with a resourceVersion
        precondition (re-reading on a conflict, so drain progress is never lost).
        Returns the status fields written (an empty dict when nothing changed).
        """
        fresh = await self._fresh(body)
        if fresh is None or fresh["metadata"].get("deletionTimestamp"):
            return {}
        meta = fresh["metadata"]
        name, namespace = meta["name"], meta["namespace"]
        await self._keep_in_sync(fresh)
        status = fresh.get("status") or {}
        previous_nodes = {n.get("node"): n for n in status.get("nodes") or []}
        observed = await self.observe(namespace, name)
        drain_timeout = min(_drain_timeout(fresh), self.settings.max_drain_timeout)
        node_objects = {n["metadata"]["name"]: n for n in await self.api.list(NODES)}
        summaries = []
        running_nodes = set()
        for endpoint in observed.endpoints:
            running_nodes.add(endpoint.node)
            daemon_status = observed.statuses.get(endpoint.node)
            drain = await self._advance_drain(
                fresh, endpoint, node_objects.get(endpoint.node), daemon_status,
                previous_nodes.get(endpoint.node) or {}, drain_timeout)
            summaries.append(node_summary(endpoint.node, endpoint.pod, daemon_status,
                                          observed.errors.get(endpoint.node), drain))
        # A daemon pod being replaced (rollout) or not yet running still keeps its node's guard.
        running_nodes |= await self.daemon_nodes(namespace, name)
        await self._remove_stale_guards(fresh, running_nodes)
        await self._sync_node_labels(fresh, running_nodes, node_objects)

        ds = await self.api.get(DAEMONSETS, manifests.names(name, namespace).daemonset,
                                self.settings.workload_namespace)
        desired = int(((ds or {}).get("status") or {}).get("desiredNumberScheduled") or 0)
        ready = sum(1 for s in summaries if s["phase"] not in ("Unreachable",))
        total = totals(summaries)

        async def compute(latest: Mapping[str, Any]) -> dict[str, Any]:
            status = latest.get("status") or {}
            problem = status.get("specProblem")
            view = ClusterView(
                generation=int(latest["metadata"].get("generation") or 0),
                spec_problem=SpecProblem(problem["reason"], problem["message"])
                if problem else None,
                daemonset=ds, nodes=summaries)
            fields: dict[str, Any] = {
                "nodes": summaries,
                "totals": total,
                "readyNodes": f"{ready}/{max(desired, len(summaries))}",
                "dirty": human_bytes(total["dirtyBytes"]),
            }
            old_conditions = status.get("conditions") or []
            conditions = build_conditions(view, old_conditions, now_iso())
            if all(key in status and status[key] == value for key, value in fields.items()) \
                    and _strip_times(conditions) == _strip_times(old_conditions):
                return {}
            fields["conditions"] = conditions
            return fields

        return await self._update_status(fresh, compute) or {}

    async def _keep_in_sync(self, body: Mapping[str, Any]) -> None:
        """The credentials copy follows its source, the access policy follows namespace labels
        (a rolled-out spec only: an invalid or refused one keeps the last good state)."""
        spec = WriteCacheSpec.from_dict(body.get("spec") or {}) if _valid(body) else None
        if spec is None or (body.get("status") or {}).get("specProblem"):
            return
        for what, result in (("credentials", await self.mirrors.credentials(body, spec)),
                             ("access policy", await self.mirrors.access(body, spec)),
                             ("S3 endpoint credentials",
                              await self.s3_endpoint.follow_source(body, spec))):
            if result != "unchanged":
                logger.info("WriteCache %s/%s: %s %s", body["metadata"]["namespace"],
                            body["metadata"]["name"], what, result)

    async def _advance_drain(self, body: Mapping[str, Any], endpoint: DaemonEndpoint,
                             node: Mapping[str, Any] | None,
                             daemon_status: NodeStatus | None,
                             previous: Mapping[str, Any], timeout: float) -> dict[str, Any]:
        """One step of a node's drain; returns the drain fields of its status entry."""
        meta = body["metadata"]
        name, namespace = meta["name"], meta["namespace"]
        reason = disruption_reason(node) if node is not None else "the node object is gone"
        if reason is None:
            if not meta.get("deletionTimestamp"):
                await self._ensure_guard(body, endpoint.node)
            # The node came back (uncordoned): writes again.
            if daemon_status is not None and daemon_status.draining:
                try:
                    await self.daemons.resume(endpoint, await self.control_token(namespace,
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
                await self.drain_daemon(endpoint, namespace, name)
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
                   - _parse_time(fields["drainStartedAt"])).total_seconds()
        if dirty == 0 and uploading == 0:
            await self._release_guard(body, endpoint.node)
            fields["drainOutcome"] = "Drained"
            fields["drainFinishedAt"] = now_iso()
            self.post_event(body, "Normal", "DrainCompleted",
                            f"node {endpoint.node}: all data is in the object store; "
                            f"released the node after {elapsed:.0f}s")
        elif elapsed >= timeout:
            await self._release_guard(body, endpoint.node)
            fields["drainOutcome"] = "TimedOut"
            fields["drainFinishedAt"] = now_iso()
            left = "unknown (daemon unreachable)" if dirty is None else human_bytes(dirty)
            self.post_event(body, "Warning", "DrainTimedOut",
                            f"node {endpoint.node}: drain timeout {timeout:.0f}s reached with "
                            f"{left} not yet in the object store; released the node")
        return fields

    async def _ensure_guard(self, body: Mapping[str, Any], node: str) -> None:
        await self.api.apply(PDBS, manifests.guard_pdb(body, node))
        await self.api.apply(PODS, manifests.guard_pod(body, node, self.settings))

    async def _release_guard(self, body: Mapping[str, Any], node: str) -> None:
        """Delete the PDB first: from then on the guard pod may be evicted with the node."""
        namespace = body["metadata"]["namespace"]
        guard = manifests.guard_name(body["metadata"]["name"], node)
        await self.api.delete(PDBS, guard, namespace)
        await self.api.delete(PODS, guard, namespace)
        logger.info("WriteCache %s/%s: released the drain guard of node %s",
                    namespace, body["metadata"]["name"], node)

    async def _remove_stale_guards(self, body: Mapping[str, Any], running: set[str]) -> None:
        meta = body["metadata"]
        selector = {manifests.LABEL_WRITECACHE: meta["name"],
                    manifests.LABEL_ROLE: "drain-guard"}
        for pod in await self.api.list(PODS, meta["namespace"], label_selector=selector):
            node = pod["metadata"].get("annotations", {}).get("cistern.dev/node-name")
            if node not in running:
                await self._release_guard(body, node or pod["spec"].get("nodeName", ""))

    # ---------------------------------------------------------------- node labels

    async def _sync_node_labels(self, body: Mapping[str, Any], daemon_nodes: set[str],
                                node_objects: Mapping[str, Mapping[str, Any]]) -> None:
        """Label ``csi.cistern.dev/<name>=true`` exactly the nodes that run this cache.

        The CSI node plugin reports that topology key only for caches mounted when the kubelet
        registered it; the label is what the scheduler reads, so the operator keeps it true to
        the daemon pods: set where a daemon pod is scheduled on a node that still matches the
        WriteCache's ``nodeSelector``, removed everywhere else.
        """
        name, namespace = body["metadata"]["name"], body["metadata"]["namespace"]
        try:
            selector = WriteCacheSpec.from_dict(body.get("spec") or {}).node_selector
        except ConfigError:  # an invalid spec keeps the last good placement
            return
        key = manifests.topology_label(name, namespace)
        for node_name, node in node_objects.items():
            has = (node.get("metadata", {}).get("labels") or {}).get(key) == "true"
            wants = node_name in daemon_nodes and manifests.node_matches(node, selector)
            if wants != has:
                await self._set_node_label(node_name, key, wants)

    async def _set_node_label(self, node: str, key: str, present: bool) -> None:
        patch = {"metadata": {"labels": {key: "true" if present else None}}}
        try:
            await self.api.patch(NODES, node, patch)
        except ApiError as exc:
            if exc.status != 404:  # a node deleted meanwhile needs no label
                raise
            return
        logger.info("Node %s: %s label %s", node, "set" if present else "removed", key)

    async def _remove_node_labels(self, name: str, namespace: str) -> None:
        """Remove this cache's label only: a same-named cache of another namespace keeps its
        own (``csi.cistern.dev/<namespace>.<name>``)."""
        key = manifests.topology_label(name, namespace)
        for node in await self.api.list(NODES):
            if key in (node.get("metadata", {}).get("labels") or {}):
                await self._set_node_label(node["metadata"]["name"], key, False)

    # ---------------------------------------------------------------- node events

    async def drain_node(self, node: Mapping[str, Any], namespaces: list[str] | None) -> int:
        """Ask every cache daemon on a disrupted node to drain now (the timer tracks it)."""
        if disruption_reason(node) is None:
            return 0
        node_name = node["metadata"]["name"]
        calls = 0
        scopes: list[str | None] = list(namespaces) if namespaces else [None]
        for namespace in scopes:
            for endpoint in await self.endpoints(namespace):
                if endpoint.node != node_name:
                    continue
                try:
                    status = await self.daemons.status(endpoint)
                    if not status.draining:
                        await self.drain_daemon(endpoint, endpoint.namespace, endpoint.writecache)
                        calls += 1
                except DaemonError as exc:
                    logger.warning("Node %s: could not start the drain of %s/%s: %s", node_name,
                                   endpoint.namespace, endpoint.writecache, exc)
        return calls

    # ---------------------------------------------------------------- deletion

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
            observed = await self.observe(namespace, name)
            token = await self.control_token(namespace, name)
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
                timeout = _drain_timeout(body)
                if waited >= timeout:
                    message += (f" (past the drain timeout of {timeout:.0f}s; annotate "
                                f"{ABANDON_ANNOTATION}=true to delete without flushing)")
                deadline = self.finalize_deadline(body)
                if waited >= deadline:
                    # Give up waiting (polled slowly from now on), loudly, keeping the data.
                    await self.report_problem(body, Problem(
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

    def finalize_deadline(self, body: Mapping[str, Any]) -> float:
        """Seconds after which a deletion stops waiting: the (bounded) drain timeout plus the
        finalizer timeout."""
        return min(_drain_timeout(body), self.settings.max_drain_timeout) + \
            self.settings.finalizer_timeout

    async def cleanup(self, body: Mapping[str, Any]) -> None:
        meta = body["metadata"]
        name, namespace = meta["name"], meta["namespace"]
        n = manifests.names(name, namespace)
        workload = self.settings.workload_namespace
        await self.api.delete(DAEMONSETS, n.daemonset, workload)
        for role in ("drain-guard",):
            for obj in await self.api.list(PDBS, namespace, label_selector={
                    manifests.LABEL_WRITECACHE: name, manifests.LABEL_ROLE: role}):
                await self.api.delete(PDBS, obj["metadata"]["name"], namespace)
            for obj in await self.api.list(PODS, namespace, label_selector={
                    manifests.LABEL_WRITECACHE: name, manifests.LABEL_ROLE: role}):
                await self.api.delete(PODS, obj["metadata"]["name"], namespace)
        await self.api.delete(CONFIGMAPS, n.configmap, workload)
        await self.api.delete(SECRETS, n.secret, workload)
        await self.api.delete(SECRETS, n.credentials, workload)
        await self.s3_endpoint.remove(body)
        await self.mirrors.remove_access(n.key)
        await self._delete_storage_classes(body, keep=None)
        await self._remove_node_labels(name, namespace)
        logger.info("WriteCache %s/%s: removed its daemons, StorageClass and node labels",
                    namespace, name)


def _valid(body: Mapping[str, Any]) -> bool:
    try:
        WriteCacheSpec.from_dict(body.get("spec") or {})
    except ConfigError:
        return False
    return True


def _drain_timeout(body: Mapping[str, Any]) -> float:
    try:
        return WriteCacheSpec.from_dict(body.get("spec") or {}).drain.timeout
    except ConfigError:
        return DrainPolicy().timeout


def _strip_times(conditions: Any) -> list[dict[str, Any]]:
    return [{k: v for k, v in c.items() if k != "lastTransitionTime"} for c in conditions or []]

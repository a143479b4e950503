"""The reconciler: WriteCache -> owned objects, and the status timer's refresh.

Handlers (``handlers.py``) are thin: they call the ``Reconciler`` and its parts and translate
``Problem`` into ``kopf.TemporaryError`` / ``kopf.PermanentError``. The parts are rooms of their
own: ``statuswriter`` (status writes), ``fleet`` (the daemons), ``drains`` (node drains and their
guards), ``nodelabels``, ``storageclasses`` and ``finalizer`` (deletion). Everything decides
"already done" by reading the cluster, so any step may be repeated.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Mapping
from typing import Any

from cistern.config import ConfigError
from cistern.operator import manifests
from cistern.operator.bodies import decode_secret, drain_timeout, valid_spec
from cistern.operator.bucketprobe import BucketProblem, probe_bucket
from cistern.operator.conflicts import CONFLICT_REASON, NewConflicts, track_conflicts
from cistern.operator.daemons import DaemonClient
from cistern.operator.drains import Drains
from cistern.operator.finalizer import Finalizer
from cistern.operator.fleet import Fleet
from cistern.operator.kubeapi import CONFIGMAPS, DAEMONSETS, NODES, SECRETS, KubeApi
from cistern.operator.mirrors import Mirrors
from cistern.operator.nodelabels import NodeLabels
from cistern.operator.peernet import PeerNetwork, port_problem
from cistern.operator.problems import EventSink, Problem
from cistern.operator.s3endpoint import S3EndpointObjects, missing_keys
from cistern.operator.settings import OperatorSettings
from cistern.operator.status import (
    ClusterView,
    SpecProblem,
    build_conditions,
    human_bytes,
    node_summary,
    now_iso,
    totals,
)
from cistern.operator.statuswriter import StatusWriter
from cistern.operator.storageclasses import StorageClasses
from cistern.operator.tenancy import PlacementError, check_placement
from cistern.writecache import WriteCacheSpec

__all__ = ["Problem", "Reconciler"]

logger = logging.getLogger(__name__)


class Reconciler:
    def __init__(self, api: KubeApi, daemons: DaemonClient, settings: OperatorSettings,
                 post_event: EventSink) -> None:
        self.api = api
        self.settings = settings
        self.post_event = post_event
        self.mirrors = Mirrors(api, settings)
        self.s3_endpoint = S3EndpointObjects(api, settings)
        self.status = StatusWriter(api, settings, post_event)
        self.fleet = Fleet(api, daemons, settings)
        self.peers = PeerNetwork(api, settings)  # issue 17: token Secret, members ConfigMap
        self.drains = Drains(api, daemons, self.fleet, settings, post_event)
        self.node_labels = NodeLabels(api)
        self.storage_classes = StorageClasses(api, settings)
        self.finalizer = Finalizer(
            api, daemons, settings, post_event, fleet=self.fleet, status=self.status,
            mirrors=self.mirrors, s3_endpoint=self.s3_endpoint,
            storage_classes=self.storage_classes, node_labels=self.node_labels)

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
            values = decode_secret(secret)
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
        if (peer_port := port_problem(spec, self.settings)) is not None:
            raise Problem("InvalidSpec", peer_port, temporary=False)
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
        results.update({k: v for k, v in (await self.peers.sync(
            body, spec, await self.fleet.endpoints(namespace, name))).items() if v != "unchanged"})
        results["DaemonSet"] = await self.api.apply(
            DAEMONSETS, manifests.daemonset(body, spec, config, self.settings))
        results["StorageClass"] = await self.storage_classes.apply(body, spec)
        results.update({k: v for k, v in (await self.s3_endpoint.sync(body, spec)).items()
                        if spec.s3_endpoint.enabled or v != "unchanged"})
        changed = {k: v for k, v in results.items() if v != "unchanged"}
        if changed:
            logger.info("WriteCache %s/%s: %s", namespace, name,
                        ", ".join(f"{k} {v}" for k, v in changed.items()))
        return results

    # ---------------------------------------------------------------- timer: status + drains

    async def refresh(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """Poll the daemons, advance node drains, keep guards, and update the status.

        Works from a fresh read of the WriteCache and writes with a resourceVersion
        precondition (re-reading on a conflict, so drain progress is never lost).
        Returns the status fields written (an empty dict when nothing changed).
        """
        fresh = await self.status.fresh(body)
        if fresh is None or fresh["metadata"].get("deletionTimestamp"):
            return {}
        meta = fresh["metadata"]
        name, namespace = meta["name"], meta["namespace"]
        await self._keep_in_sync(fresh)
        status = fresh.get("status") or {}
        previous_nodes = {n.get("node"): n for n in status.get("nodes") or []}
        observed = await self.fleet.observe(namespace, name)
        await self.peers.follow_pods(fresh, observed.endpoints)
        timeout = min(drain_timeout(fresh), self.settings.max_drain_timeout)
        node_objects = {n["metadata"]["name"]: n for n in await self.api.list(NODES)}
        summaries = []
        new_conflicts: list[NewConflicts] = []
        running_nodes = set()
        for endpoint in observed.endpoints:
            running_nodes.add(endpoint.node)
            daemon_status = observed.statuses.get(endpoint.node)
            drain = await self.drains.advance(
                fresh, endpoint, node_objects.get(endpoint.node), daemon_status,
                previous_nodes.get(endpoint.node) or {}, timeout)
            summary = node_summary(endpoint.node, endpoint.pod, daemon_status,
                                   observed.errors.get(endpoint.node), drain)
            conflict_fields, new = track_conflicts(
                endpoint.node, endpoint.pod, daemon_status,
                previous_nodes.get(endpoint.node) or {})
            summary.update(conflict_fields)
            summaries.append(summary)
            if new is not None:
                new_conflicts.append(new)
        # A daemon pod being replaced (rollout) or not yet running still keeps its node's guard.
        running_nodes |= await self.fleet.daemon_nodes(namespace, name)
        await self.drains.remove_stale_guards(fresh, running_nodes)
        await self.node_labels.sync(fresh, running_nodes, node_objects)

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

        written = await self.status.update(fresh, compute) or {}
        # Announced once the status holding the new counts is written: that count is what the
        # next refresh compares with, so a conflict gets one Event.
        if written:
            for new in new_conflicts:
                self.post_event(fresh, "Warning", CONFLICT_REASON, new.message())
        return written

    async def _keep_in_sync(self, body: Mapping[str, Any]) -> None:
        """The credentials copy follows its source, the access policy follows namespace labels
        (a rolled-out spec only: an invalid or refused one keeps the last good state)."""
        spec = valid_spec(body)
        if spec is None or (body.get("status") or {}).get("specProblem"):
            return
        for what, result in (("credentials", await self.mirrors.credentials(body, spec)),
                             ("access policy", await self.mirrors.access(body, spec)),
                             ("S3 endpoint credentials",
                              await self.s3_endpoint.follow_source(body, spec))):
            if result != "unchanged":
                logger.info("WriteCache %s/%s: %s %s", body["metadata"]["namespace"],
                            body["metadata"]["name"], what, result)


def _strip_times(conditions: Any) -> list[dict[str, Any]]:
    return [{k: v for k, v in c.items() if k != "lastTransitionTime"} for c in conditions or []]

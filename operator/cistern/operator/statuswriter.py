"""Writing a WriteCache's status: a precondition on the version read, re-read on conflicts;
the status after a rollout and after a refused spec."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from cistern.operator import manifests
from cistern.operator.kubeapi import DAEMONSETS, WRITECACHES, ApiError, KubeApi
from cistern.operator.problems import EventSink, Problem
from cistern.operator.s3endpoint import endpoint_url
from cistern.operator.settings import OperatorSettings
from cistern.operator.status import ClusterView, SpecProblem, build_conditions, now_iso
from cistern.writecache import WriteCacheSpec, storage_class_name

__all__ = ["StatusWriter"]


class StatusWriter:
    def __init__(self, api: KubeApi, settings: OperatorSettings, post_event: EventSink) -> None:
        self.api = api
        self.settings = settings
        self.post_event = post_event

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

    async def fresh(self, body: Mapping[str, Any]) -> dict[str, Any] | None:
        """The WriteCache as the API server holds it now (None: gone)."""
        meta = body["metadata"]
        return await self.api.get(WRITECACHES, meta["name"], meta["namespace"])

    async def update(self, body: Mapping[str, Any],
                     compute: Callable[[Mapping[str, Any]], Awaitable[dict[str, Any]]],
                     attempts: int = 5) -> dict[str, Any] | None:
        """Read the latest object, compute the status from it, write it; retry on conflicts.

        Returns the fields written, or None when the object is gone.
        """
        for attempt in range(attempts):
            fresh = await self.fresh(body)
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

    async def _daemonset(self, body: Mapping[str, Any]) -> dict[str, Any] | None:
        meta = body["metadata"]
        return await self.api.get(DAEMONSETS, manifests.names(
            meta["name"], meta["namespace"]).daemonset, self.settings.workload_namespace)

    async def report_applied(self, body: Mapping[str, Any], spec: WriteCacheSpec) -> None:
        meta = body["metadata"]
        ds = await self._daemonset(body)

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

        await self.update(body, compute)

    async def report_problem(self, body: Mapping[str, Any], problem: Problem) -> None:
        """Degraded with the reason; nothing owned is touched, so a working cache keeps working."""
        ds = await self._daemonset(body)
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

        await self.update(body, compute)
        if old.get("reason") != problem.reason or old.get("message") != problem.message:
            self.post_event(body, "Warning", problem.reason, problem.message)

"""kopf handlers: thin adapters from kopf's callbacks to the ``Reconciler``.

``build_registry`` registers everything on a fresh registry, with the settings, API client and
daemon client passed in (no module-level state), so tests can run several operators.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Mapping
from typing import Any

import kopf

from cistern.operator.daemons import DaemonClient, DaemonError
from cistern.operator.kubeapi import ApiError, Credentials, KubeApi
from cistern.operator.reconcile import Problem, Reconciler
from cistern.operator.settings import OperatorSettings

__all__ = ["GROUP", "PLURAL", "VERSION", "build_registry"]

GROUP, VERSION, PLURAL = "cistern.dev", "v1alpha1", "writecaches"
FINALIZER = "cistern.dev/finalizer"


def _post_event(body: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
    kopf.event(dict(body), type=type_, reason=reason, message=message)  # type: ignore[arg-type]


def build_registry(settings: OperatorSettings, credentials: Credentials,
                   namespaces: list[str] | None = None) -> kopf.OperatorRegistry:
    """All handlers of the operator on a new registry.

    ``namespaces``: the namespaces served (None: all), used to find daemons on a drained node.
    """
    registry = kopf.OperatorRegistry()
    api = KubeApi(credentials)
    daemons = DaemonClient(settings.http_timeout)
    reconciler = Reconciler(api, daemons, settings, _post_event)

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.persistence.finalizer = FINALIZER
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(
            prefix="cistern.dev")
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
            prefix="cistern.dev", key="last-handled-configuration")
        settings.posting.level = logging.WARNING
        settings.watching.server_timeout = 300
        # Let the status timer finish its current poll on shutdown instead of being orphaned.
        settings.background.instant_exit_timeout = 0.5

    @kopf.on.cleanup(registry=registry)
    async def close_clients(**_: Any) -> None:
        await api.close()
        await daemons.close()

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        token = credentials.token
        if credentials.token_file:
            with open(credentials.token_file) as file:  # startup only, before any handler runs
                token = file.read().strip()
        return kopf.ConnectionInfo(
            server=credentials.server, ca_path=credentials.ca_file,
            insecure=credentials.insecure, scheme="Bearer" if token else None, token=token,
            certificate_path=credentials.cert_file, private_key_path=credentials.key_file,
            default_namespace=credentials.default_namespace)

    async def reconcile(body: kopf.Body, logger: kopf.Logger, **_: Any) -> None:
        try:
            spec = await reconciler.validate(body)
        except Problem as problem:
            logger.warning("Not rolling out the spec: %s: %s", problem.reason, problem.message)
            await reconciler.status.report_problem(body, problem)
            if problem.temporary:
                raise kopf.TemporaryError(problem.message, delay=problem.delay) from None
            raise kopf.PermanentError(problem.message) from None
        try:
            results = await reconciler.apply(body, spec)
        except Problem as problem:
            await reconciler.status.report_problem(body, problem)
            raise kopf.TemporaryError(problem.message, delay=problem.delay) from None
        except ApiError as exc:
            raise kopf.TemporaryError(f"API error while applying: {exc}", delay=10) from exc
        await reconciler.status.report_applied(body, spec)
        changed = {k: v for k, v in results.items() if v != "unchanged"}
        if changed:
            _post_event(body, "Normal", "Applied", "; ".join(
                f"{kind} {result}" for kind, result in changed.items()))

    for decorator, handler_id in ((kopf.on.create, "create"), (kopf.on.update, "update"),
                                  (kopf.on.resume, "resume")):
        decorator(GROUP, VERSION, PLURAL, id=handler_id, registry=registry,
                  backoff=10)(reconcile)

    @kopf.timer(GROUP, VERSION, PLURAL, id="status", registry=registry,
                interval=settings.status_interval, initial_delay=min(1.0,
                                                                     settings.status_interval))
    async def refresh_status(body: kopf.Body, logger: kopf.Logger, **_: Any) -> None:
        if body.get("metadata", {}).get("deletionTimestamp"):
            return
        try:
            await reconciler.refresh(body)
        except (ApiError, DaemonError) as exc:
            logger.warning("Status refresh failed: %s", exc)

    @kopf.on.delete(GROUP, VERSION, PLURAL, id="finalize", registry=registry, backoff=5)
    async def finalize(body: kopf.Body, started: datetime.datetime, **_: Any) -> None:
        waited = (datetime.datetime.now(datetime.UTC)
                  - started.replace(tzinfo=started.tzinfo or datetime.UTC)).total_seconds()
        try:
            waiting = await reconciler.finalizer.finalize(body, waited)
        except ApiError as exc:
            raise kopf.TemporaryError(f"API error during deletion: {exc}", delay=10) from exc
        if waiting:
            gave_up = waited >= reconciler.finalizer.deadline(body)
            raise kopf.TemporaryError(waiting, delay=settings.finalizer_gave_up_poll
                                      if gave_up else settings.finalizer_poll)

    @kopf.on.event("", "v1", "nodes", registry=registry)
    async def node_changed(body: kopf.Body, type: str | None, logger: kopf.Logger,
                           **_: Any) -> None:
        if type == "DELETED":
            return
        try:
            calls = await reconciler.drains.drain_node(body, namespaces)
        except ApiError as exc:
            logger.warning("Could not look for cache daemons on the node: %s", exc)
            return
        if calls:
            logger.info("Started the drain of %d cache daemon(s) on the node", calls)

    return registry

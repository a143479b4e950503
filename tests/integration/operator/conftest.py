"""Fixtures for running the real operator (kopf) against KMock's Kubernetes API emulator.

KMock 0.8 stores objects and serves discovery, lists and watches over real HTTP, but it sets
no ``uid``/``resourceVersion``/``generation``, keeps ``stringData`` as sent, and runs no
controllers, garbage collection or admission. ``ClusterEmulator`` adds the object metadata a
real API server would (a new ``resourceVersion`` on every write, which kopf relies on to skip
the stale echoes of its own patches, and 409 when a patch names an outdated one;
``generation`` bumped by spec changes; names for ``generateName``; 422 for a failed JSON-patch
test). The tests play the DaemonSet controller
themselves: they create the daemon pods, pointing at ``DaemonStandIn`` control servers on
127.0.0.x.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import datetime
import itertools
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import jsonpatch
import kmock
import kopf
import pytest
import pytest_asyncio
from aiohttp import web
from kmock import Request

from cistern.nodestatus import NodeStatus
from cistern.operator.handlers import build_registry
from cistern.operator.kubeapi import DAEMONSETS, PODS, Credentials, KubeApi
from cistern.operator.kubeapi import NODES as NODE_RESOURCE
from cistern.operator.settings import OperatorSettings
from cistern.writecache import cache_key
from support.s3server import free_port
from support.wait import async_wait_until

from .pod_runner_harness import harness as harness  # the pod-runner tests' fixture

NAMESPACE = "ml"
#: The operator's own namespace: the privileged daemons and their objects live here.
WORKLOAD = "cistern-system"
NODES = ("node-a", "node-b")


class ClusterEmulator(kmock.KubernetesEmulator):
    """KMock's emulator plus the metadata the API server stamps on every object."""

    _versions = itertools.count(1000)
    #: Namespaces and their labels, as ``GET /api/v1/namespaces`` lists them.
    namespaces: dict[str, dict[str, str]] = {  # noqa: RUF012 - a test double's table
        NAMESPACE: {}, WORKLOAD: {}, "team-b": {"cistern.dev/share": "ckpt"}}

    async def __call__(self, raw_request: web.BaseRequest) -> web.StreamResponse:
        # KMock 0.8 cannot parse the namespace list URL itself (it reads "namespaces" as the
        # start of /namespaces/NAME/...); kopf lists and watches it when given namespaces.
        if raw_request.path == "/api/v1/namespaces":
            return await self._serve_namespaces(raw_request)
        return await super().__call__(raw_request)

    async def _serve_namespaces(self, raw_request: web.BaseRequest) -> web.StreamResponse:
        items = [{"apiVersion": "v1", "kind": "Namespace",
                  "metadata": {"name": name, "uid": name, "resourceVersion": "1",
                               "labels": labels}}
                 for name, labels in self.namespaces.items()]
        if raw_request.query.get("watch") != "true":
            return web.json_response({"apiVersion": "v1", "kind": "NamespaceList",
                                      "metadata": {"resourceVersion": "1"}, "items": items})
        response = web.StreamResponse()
        await response.prepare(raw_request)  # type: ignore[arg-type]
        await asyncio.sleep(1.0)  # nothing changes; end the watch, kopf starts another
        await response.write_eof()
        return response

    async def _handle(self, request: kmock.Request) -> Any:
        data = request.data
        if request.resource is not None and isinstance(data, dict):
            if request.action == kmock.action.CREATE:
                meta = data.setdefault("metadata", {})
                if not meta.get("name") and meta.get("generateName"):
                    meta["name"] = meta["generateName"] + uuid.uuid4().hex[:8]
                meta.setdefault("uid", str(uuid.uuid4()))
                meta.setdefault("creationTimestamp", datetime.datetime.now(
                    datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
                meta["resourceVersion"] = str(next(self._versions))
                meta.setdefault("generation", 1)
                if request.namespace and "namespace" not in meta:
                    meta["namespace"] = request.namespace
                string_data = data.pop("stringData", None)
                if string_data:
                    data.setdefault("data", {}).update({
                        k: base64.b64encode(v.encode()).decode() for k, v in string_data.items()})
            elif request.action == kmock.action.UPDATE:
                meta = data.setdefault("metadata", {})
                stored = self._stored(request)
                expected = meta.get("resourceVersion")
                if expected is not None and stored is not None and expected != stored.get(
                        "metadata", {}).get("resourceVersion"):
                    raise kmock.KubernetesError(
                        status=409, reason="Conflict", message="the object has been modified; "
                        "please apply your changes to the latest version and try again")
                meta["resourceVersion"] = str(next(self._versions))
                if not request.subresource and "spec" in data and stored is not None:
                    meta["generation"] = stored.get("metadata", {}).get("generation", 1) + 1
        elif (request.resource is not None and isinstance(data, list)
              and request.action == kmock.action.UPDATE):
            # A JSON patch whose "test" fails is rejected with 422, as the API server does
            # (KMock would answer 500, which clients retry unchanged forever).
            stored = self._stored(request)
            if stored is not None:
                try:
                    jsonpatch.apply_patch(copy.deepcopy(stored.raw), data)
                except jsonpatch.JsonPatchException as exc:
                    raise kmock.KubernetesError(status=422, reason="Invalid",
                                                message=f"the patch test failed: {exc}") from None
            data.append({"op": "replace", "path": "/metadata/resourceVersion",
                         "value": str(next(self._versions))})
        return await super()._handle(request)

    def _stored(self, request: kmock.Request) -> kmock.Object | None:
        if request.resource is None or request.name is None:
            return None
        try:
            obj = self.objects[request.resource, request.namespace, request.name]
        except KeyError:
            return None
        return None if obj.deleted else obj


RESOURCES: dict[str, dict[str, Any]] = {
    "cistern.dev/v1alpha1/writecaches": {"kind": "WriteCache", "namespaced": True,
                                         "subresources": {"status"}, "shortnames": {"wc"}},
    "v1/nodes": {"kind": "Node", "namespaced": False},
    "v1/pods": {"kind": "Pod", "namespaced": True},
    "v1/configmaps": {"kind": "ConfigMap", "namespaced": True},
    "v1/secrets": {"kind": "Secret", "namespaced": True},
    "v1/services": {"kind": "Service", "namespaced": True},
    "v1/events": {"kind": "Event", "namespaced": True},
    "v1/namespaces": {"kind": "Namespace", "namespaced": False},
    "apps/v1/daemonsets": {"kind": "DaemonSet", "namespaced": True,
                           "subresources": {"status"}},
    "policy/v1/poddisruptionbudgets": {"kind": "PodDisruptionBudget", "namespaced": True},
    "storage.k8s.io/v1/storageclasses": {"kind": "StorageClass", "namespaced": False},
}
VERBS = {"get", "list", "watch", "create", "patch", "update", "delete"}


@dataclass
class DaemonStandIn:
    """A node daemon's control API: serves /status from ``state``, records POSTs."""

    node: str
    host: str
    port: int
    state: NodeStatus = field(default_factory=lambda: NodeStatus(state="running"))
    calls: list[tuple[str, str, str | None]] = field(default_factory=list)
    """(method, path, Authorization header) of every call."""
    token: str | None = None
    """When set, POSTs without ``Bearer <token>`` get 401 (as the real daemon does)."""
    _runner: web.AppRunner | None = None

    async def _status(self, request: web.Request) -> web.Response:
        self.calls.append(("GET", "/status", request.headers.get("Authorization")))
        return web.json_response(self.state.to_json())

    def update(self, **changes: Any) -> None:
        """Change what /status reports (``NodeStatus`` fields)."""
        self.state = self.state.replace(**changes)

    async def _post(self, request: web.Request) -> web.Response:
        auth = request.headers.get("Authorization")
        self.calls.append(("POST", request.path, auth))
        if self.token is not None and auth != f"Bearer {self.token}":
            return web.json_response({"error": "unauthorized"}, status=401)
        if request.path == "/drain" and self.state.state == "running":
            self.update(state="draining" if self.state.dirty_bytes else "drained")
        if request.path == "/resume":
            self.update(state="running")
        return web.json_response(self.state.to_json())

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/status", self._status)
        app.router.add_post("/drain", self._post)
        app.router.add_post("/flush", self._post)
        app.router.add_post("/resume", self._post)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def polls(self) -> int:
        """GET /status calls so far (the operator reads every daemon on each refresh)."""
        return sum(1 for call in self.calls if call[:2] == ("GET", "/status"))

    async def polled(self, times: int) -> None:
        """Until the operator has read this daemon's status ``times`` more times: what it does
        between those reads is what it does for a steady state, without a fixed sleep."""
        target = self.polls() + times
        await async_wait_until(lambda: self.polls() >= target, timeout=15.0,
                               what=f"{times} status reads of the daemon on {self.node}")

    def posts(self, path: str) -> list[tuple[str, str, str | None]]:
        return [c for c in self.calls if c[0] == "POST" and c[1] == path]


async def wait_for(predicate: Callable[[], Awaitable[Any] | Any], timeout: float = 15.0,
                   what: str = "condition") -> Any:
    """``async_wait_until``, with a half-built object (a missing key) counting as 'not yet'."""
    return await async_wait_until(predicate, timeout=timeout, what=what,
                                  ignore=(KeyError, IndexError, TypeError))


@dataclass
class Cluster:
    """The emulated cluster, a client for it, and the daemon stand-ins per node."""

    kmock: ClusterEmulator
    api: KubeApi
    daemons: dict[str, DaemonStandIn]
    control_port: int

    def obj(self, resource: str, name: str, namespace: str | None = NAMESPACE
            ) -> dict[str, Any] | None:
        try:
            obj = self.kmock.objects[resource, namespace, name]
        except KeyError:
            return None
        return None if obj.deleted else dict(obj.raw)

    def writecache(self, name: str) -> dict[str, Any] | None:
        return self.obj("cistern.dev/v1alpha1/writecaches", name)

    def condition(self, name: str, kind: str) -> dict[str, Any] | None:
        wc = self.writecache(name) or {}
        for cond in (wc.get("status") or {}).get("conditions") or []:
            if cond["type"] == kind:
                return dict(cond)
        return None

    def events(self, reason: str) -> list[dict[str, Any]]:
        return [dict(obj.raw) for (res, _, _), obj in self.kmock.objects.items()
                if res == kmock.resource("v1/events") and not obj.deleted
                and obj.get("reason") == reason]

    def writes(self, resource: str) -> list[Request]:
        """POST/PATCH/DELETE requests the operator sent for a resource (e.g. 'daemonsets')."""
        return [r for r in self.kmock
                if r.method in ("POST", "PATCH", "DELETE", "PUT")
                and r.resource is not None and r.resource.plural == resource]

    async def schedule_daemons(self, name: str, nodes: tuple[str, ...] = NODES,
                               namespace: str = NAMESPACE) -> None:
        """Play the DaemonSet controller: one ready daemon pod per node, DS status updated.

        The DaemonSet of WriteCache ``namespace/name`` lives in the operator's namespace."""
        ds_name = f"cistern-{cache_key(namespace, name)}"
        ds = await self.api.get(DAEMONSETS, ds_name, WORKLOAD)
        assert ds is not None
        labels = ds["spec"]["template"]["metadata"]["labels"]
        prefix = name if namespace == NAMESPACE else f"{namespace}-{name}"
        for node in nodes:
            daemon = self.daemons[node]
            await self.api.create(PODS, {
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": f"cistern-{prefix}-{node}", "namespace": WORKLOAD,
                             "labels": labels},
                "spec": {"nodeName": node, "containers": []},
                "status": {"phase": "Running", "podIP": daemon.host,
                           "conditions": [{"type": "Ready", "status": "True"}]},
            }, WORKLOAD)
        await self.api.patch(DAEMONSETS, ds_name, {"status": {
            "desiredNumberScheduled": len(nodes), "numberReady": len(nodes),
            "updatedNumberScheduled": len(nodes),
            "observedGeneration": ds["metadata"].get("generation", 1)}}, WORKLOAD,
            subresource="status")



@pytest_asyncio.fixture()
async def cluster(kmock: ClusterEmulator) -> AsyncIterator[Cluster]:
    for key, info in RESOURCES.items():
        kmock.resources[key] = kmock.ResourceInfo(verbs=VERBS, **info)
    api = KubeApi(Credentials(server=str(kmock.url).rstrip("/")))
    for node in NODES:
        await api.create(NODE_RESOURCE, {"apiVersion": "v1", "kind": "Node",
                                         "metadata": {"name": node}, "spec": {}})
    port = free_port()
    daemons = {node: DaemonStandIn(node=node, host=f"127.0.0.{i + 2}", port=port)
               for i, node in enumerate(NODES)}
    for daemon in daemons.values():
        await daemon.start()
    try:
        yield Cluster(kmock=kmock, api=api, daemons=daemons, control_port=port)
    finally:
        for daemon in daemons.values():
            await daemon.stop()
        await api.close()



def operator_settings(cluster: Cluster, **overrides: Any) -> OperatorSettings:
    values: dict[str, Any] = {
        "daemon_image": "cistern:test", "control_port": cluster.control_port,
        "status_interval": 0.3, "http_timeout": 2.0, "check_object_store": False,
        "retry_delay": 0.5, "finalizer_poll": 0.3, "mount_root": "/var/lib/cistern/mounts",
    }
    values.update(overrides)
    return OperatorSettings(**values)


@contextlib.asynccontextmanager
async def running_operator(cluster: Cluster, settings: OperatorSettings,
                           namespaces: list[str] | None = None) -> AsyncIterator[None]:
    """The real operator (kopf.operator with our registry) as a task on this loop."""
    registry = build_registry(settings, Credentials(server=str(cluster.kmock.url).rstrip("/")),
                              namespaces)
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(kopf.operator(
        registry=registry, standalone=True, clusterwide=namespaces is None,
        namespaces=namespaces or (), stop_flag=stop, ready_flag=ready))
    try:
        await asyncio.wait_for(ready.wait(), 20)
        yield
    finally:
        stop.set()
        try:
            await asyncio.wait_for(task, 20)
        except TimeoutError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


@pytest.fixture()
def kmock_options(kmock_options: dict[str, Any]) -> dict[str, Any]:
    return {**kmock_options, "cls": ClusterEmulator}


#: Loggers whose warnings the tests provoke on purpose (handler retries of bad specs).
EXPECTED_WARNING_LOGGERS = {"kopf.objects", "cistern.operator.reconcile",
                            "cistern.operator.drains"}
#: kopf's notice when the test stops the operator while watch events are still queued.
SHUTDOWN_NOISE = ("Unprocessed streams left",)


@pytest.fixture(autouse=True)
def no_unexpected_log_warnings(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Fail on warnings nobody asked for: unclosed sessions, failed event posts, lost streams."""
    yield
    unexpected = [f"{r.name}: {r.getMessage()[:200]}" for r in caplog.get_records("call")
                  if r.levelno >= logging.WARNING and r.name not in EXPECTED_WARNING_LOGGERS
                  and not r.getMessage().startswith(SHUTDOWN_NOISE)]
    assert not unexpected, unexpected

"""The daemons of a WriteCache: their pods, their control token, what they answer."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from cistern.nodestatus import NodeStatus
from cistern.operator import manifests
from cistern.operator.bodies import decode_secret
from cistern.operator.daemons import DaemonClient, DaemonEndpoint, DaemonError
from cistern.operator.kubeapi import PODS, SECRETS, KubeApi
from cistern.operator.settings import OperatorSettings

__all__ = ["Fleet", "Observed"]


@dataclass(frozen=True)
class Observed:
    """The daemons of one WriteCache and what they said."""

    endpoints: list[DaemonEndpoint]
    statuses: dict[str, NodeStatus | None]
    errors: dict[str, str]


class Fleet:
    def __init__(self, api: KubeApi, daemons: DaemonClient, settings: OperatorSettings) -> None:
        self.api = api
        self.daemons = daemons
        self.settings = settings

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
        return None if secret is None else decode_secret(secret).get("token")

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

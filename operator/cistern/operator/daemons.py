"""Calls to the node daemons' control API (``GET /status``, ``POST /drain|/resume``).

Each answers the node's status, parsed into ``cistern.nodestatus.NodeStatus``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import aiohttp

from cistern.nodestatus import NodeStatus, NodeStatusError
from cistern.operator.httpsession import LazySession

__all__ = ["DaemonClient", "DaemonEndpoint", "DaemonError"]

logger = logging.getLogger(__name__)


class DaemonError(Exception):
    """The daemon could not be reached or refused the call."""


@dataclass(frozen=True)
class DaemonEndpoint:
    """One running daemon: the node it serves and where its control API listens."""

    node: str
    pod: str
    host: str
    port: int
    ready: bool = True
    namespace: str = ""
    """Namespace of the WriteCache (and of the pod)."""
    writecache: str = ""
    """Name of the WriteCache the daemon serves."""

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


class DaemonClient:
    """One aiohttp session for all daemons; every call has a timeout."""

    def __init__(self, timeout: float) -> None:
        self._session = LazySession(
            timeout, lambda: DaemonError("the operator is shutting down"))

    async def close(self) -> None:
        """Close the session; later calls fail (a handler still running at shutdown)."""
        await self._session.close()

    async def _call(self, method: str, endpoint: DaemonEndpoint, path: str,
                    token: str | None = None) -> NodeStatus:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        url = endpoint.base_url + path
        try:
            session = await self._session.get()
            async with session.request(method, url, headers=headers) as response:
                if response.status >= 400:
                    text = (await response.text())[:200]
                    raise DaemonError(f"{method} {path} on node {endpoint.node}: "
                                      f"HTTP {response.status} {text}")
                result = await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise DaemonError(f"{method} {path} on node {endpoint.node}: "
                              f"{type(exc).__name__}: {exc}") from exc
        try:
            return NodeStatus.from_json(result)
        except NodeStatusError as exc:
            raise DaemonError(f"{method} {path} on node {endpoint.node}: not a node status: "
                              f"{exc}") from exc

    async def status(self, endpoint: DaemonEndpoint) -> NodeStatus:
        return await self._call("GET", endpoint, "/status")

    async def resume(self, endpoint: DaemonEndpoint, token: str | None) -> NodeStatus:
        logger.info("Asking the daemon on node %s (pod %s) to accept writes again",
                    endpoint.node, endpoint.pod)
        return await self._call("POST", endpoint, "/resume", token)

    async def drain(self, endpoint: DaemonEndpoint, token: str | None) -> NodeStatus:
        logger.info("Asking the daemon on node %s (pod %s) to drain", endpoint.node, endpoint.pod)
        return await self._call("POST", endpoint, "/drain", token)

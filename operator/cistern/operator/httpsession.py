"""The operator's HTTP clients (the Kubernetes API, the daemons' control API) each hold one
aiohttp session, made on first use and closed once at shutdown."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import aiohttp

__all__ = ["LazySession"]


class LazySession:
    """One aiohttp session, opened on first use. After ``close`` (the operator shutting down)
    a call raises ``closed_error()`` instead of opening a new session for a handler that is
    still running."""

    def __init__(self, timeout: float, closed_error: Callable[[], Exception]) -> None:
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._closed_error = closed_error
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    async def get(self, connector: Callable[[], Awaitable[aiohttp.BaseConnector | None]]
                  | None = None) -> aiohttp.ClientSession:
        """The session; ``connector`` makes the connector of a new one (TLS settings)."""
        if self._closed:
            raise self._closed_error()
        if self._session is None or self._session.closed:
            made = await connector() if connector is not None else None
            self._session = aiohttp.ClientSession(connector=made, timeout=self._timeout)
        return self._session

    async def close(self) -> None:
        self._closed = True
        if self._session is not None:
            await self._session.close()
            self._session = None

"""The proxy in this process (``FaultProxy``, served by a background thread) or as a child
process (``FaultProxyProcess``, controlled through ``ProxyControl``)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from types import TracebackType
from typing import Any

from ..s3server import ChildServer
from .config import ProxyConfig
from .control import ProxyControl
from .relay import RelayServer
from .state import LogEntry, ProxyState

__all__ = ["FaultProxy", "FaultProxyProcess"]

logger = logging.getLogger(__name__)


class FaultProxy:
    """The proxy in this process, served by a background thread (one thread per connection)."""

    def __init__(self, upstream: str, latency: float = 0.0, error_rate: float = 0.0,
                 *, internal_error_rate: float = 0.0, error_kinds: Iterable[str] | None = None,
                 outage: bool = False, outage_mode: str = "error", seed: int | None = None,
                 port: int = 0, log_size: int = 100_000) -> None:
        config = ProxyConfig(
            latency=latency, error_rate=error_rate, internal_error_rate=internal_error_rate,
            error_kinds=frozenset(error_kinds) if error_kinds is not None else None,
            outage=outage, outage_mode=outage_mode, seed=seed,
        )
        self._state = ProxyState(upstream.rstrip("/"), config, log_size)
        self._port = port
        self._server: RelayServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the proxy is not started")
        return int(self._server.server_address[1])

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def upstream(self) -> str:
        return self._state.upstream

    @property
    def config(self) -> ProxyConfig:
        return self._state.config

    def start(self) -> FaultProxy:
        self._server = RelayServer(("127.0.0.1", self._port), self._state)
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name=f"faultproxy-{self.port}", daemon=True)
        self._thread.start()
        logger.info("fault proxy on %s -> %s", self.endpoint, self.upstream)
        return self

    def serve_forever(self) -> None:
        """Serve in the calling thread (the process entry point)."""
        self._server = RelayServer(("127.0.0.1", self._port), self._state)
        try:
            self._server.serve_forever()
        finally:
            self._server.server_close()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._server = None
        self._thread = None

    def set(self, **changes: Any) -> ProxyConfig:
        """Change settings of ``ProxyConfig`` at runtime; returns the new config."""
        return self._state.set(**changes)

    def counts(self) -> dict[str, int]:
        """Requests received per kind (injected failures included) and ``THROTTLED``."""
        return dict(self._state.stats()["counts"])

    def throttled(self) -> dict[str, int]:
        """Injected failures per kind."""
        return dict(self._state.stats()["throttled"])

    def stats(self) -> dict[str, Any]:
        return self._state.stats()

    def log(self) -> list[LogEntry]:
        return self._state.log_entries()

    def reset(self) -> None:
        """Clear counters and log (the config is kept)."""
        self._state.reset()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


class FaultProxyProcess(ChildServer):
    """``python -m support.faultproxy`` as a child process on a free port."""

    module = "faultproxy"

    def __init__(self, upstream: str, latency: float = 0.0, error_rate: float = 0.0,
                 *, port: int | None = None, extra_args: list[str] | None = None) -> None:
        super().__init__(port)
        self.upstream = upstream
        self._args = [
            "--upstream", upstream, "--port", str(self.port),
            "--latency-ms", str(latency * 1000.0), "--error-rate", str(error_rate),
            *(extra_args or []),
        ]
        self.control = ProxyControl(self.endpoint)

    def arguments(self) -> list[str]:
        return self._args

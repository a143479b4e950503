"""The control API of a proxy: its endpoints (``/__proxy/...``, answered by the relay before
any S3 handling) and ``ProxyControl``, their client for a proxy in another process."""

from __future__ import annotations

import json
import urllib.request
from dataclasses import fields
from typing import Any

from .config import ProxyConfig
from .state import LogEntry, ProxyState

__all__ = ["CONTROL_PREFIX", "ProxyControl", "answer_control"]

CONTROL_PREFIX = "/__proxy/"


def answer_control(state: ProxyState, method: str, name: str, body: bytes
                   ) -> tuple[int, Any]:
    """The status and JSON payload of control call ``method /__proxy/<name>``."""
    try:
        if method == "GET" and name == "stats":
            return 200, state.stats()
        if method == "GET" and name == "log":
            return 200, [list(e) for e in state.log_entries()]
        if method == "POST" and name == "config":
            changes = json.loads(body or b"{}")
            if not isinstance(changes, dict):
                raise ValueError("config body must be a JSON object")
            return 200, state.set(**changes).to_json()
        if method == "POST" and name == "reset":
            state.reset()
            return 200, state.stats()
        return 404, {"error": f"no control endpoint {method} {name}"}
    except (ValueError, TypeError) as exc:
        return 400, {"error": str(exc)}


class ProxyControl:
    """Reads and changes a proxy running in another process through its control endpoints."""

    def __init__(self, endpoint: str, timeout: float = 10.0) -> None:
        self.endpoint = endpoint.rstrip("/")
        self.timeout = timeout

    def _call(self, method: str, name: str, payload: Any = None) -> Any:
        data = json.dumps(payload).encode() if payload is not None else None
        req = urllib.request.Request(f"{self.endpoint}{CONTROL_PREFIX}{name}", data=data,
                                     method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=self.timeout) as resp:
            return json.loads(resp.read())

    def stats(self) -> dict[str, Any]:
        return dict(self._call("GET", "stats"))

    def counts(self) -> dict[str, int]:
        return dict(self.stats()["counts"])

    def log(self) -> list[LogEntry]:
        return [LogEntry(*entry) for entry in self._call("GET", "log")]

    def set(self, **changes: Any) -> dict[str, Any]:
        if "error_kinds" in changes and changes["error_kinds"] is not None:
            changes["error_kinds"] = sorted(changes["error_kinds"])
        return dict(self._call("POST", "config", changes))

    def reset(self) -> None:
        self._call("POST", "reset", {})

    def restore(self) -> None:
        """As freshly started without options: every setting at its default, counters and log
        cleared (one proxy process serves many tests)."""
        self.set(**{f.name: f.default for f in fields(ProxyConfig)})
        self.reset()

"""What the connection threads share: the config in force, the fault decisions, counters and
the log of completed requests."""

from __future__ import annotations

import collections
import random
import threading
import time
import urllib.parse
from dataclasses import replace
from typing import Any, NamedTuple

from .config import ProxyConfig, config_changes
from .kinds import KINDS

__all__ = ["LogEntry", "ProxyState"]


class LogEntry(NamedTuple):
    """One completed S3 request: wall-clock completion time, kind, object key, status."""

    time: float
    kind: str
    key: str
    status: int


class ProxyState:
    """Configuration, counters and log shared by the handler threads."""

    def __init__(self, upstream: str, config: ProxyConfig, log_size: int) -> None:
        parsed = urllib.parse.urlsplit(upstream)
        if parsed.scheme != "http" or not parsed.hostname:
            raise ValueError(f"upstream must be an http:// URL, got {upstream!r}")
        self.upstream = upstream
        self.upstream_host = parsed.hostname
        self.upstream_port = parsed.port or 80
        self.lock = threading.Lock()
        self.config = config.validate()
        self.random = random.Random(config.seed)
        self.counts: collections.Counter[str] = collections.Counter()
        self.throttled: collections.Counter[str] = collections.Counter()
        self.bytes_in = 0
        self.bytes_out = 0
        self.log: collections.deque[LogEntry] = collections.deque(maxlen=log_size)
        self.corrupt_left = self.config.corrupt_gets

    def set(self, **changes: Any) -> ProxyConfig:
        changes = config_changes(changes)
        with self.lock:
            new = replace(self.config, **changes).validate()
            if "seed" in changes:
                self.random = random.Random(new.seed)
            if "corrupt_gets" in changes:
                self.corrupt_left = new.corrupt_gets
            self.config = new
            return new

    def reset(self) -> None:
        with self.lock:
            self.counts.clear()
            self.throttled.clear()
            self.bytes_in = 0
            self.bytes_out = 0
            self.log.clear()

    def decide(self, kind: str) -> tuple[ProxyConfig, str | None]:
        """Count the request and return the config in force and an injected error code."""
        with self.lock:
            config = self.config
            self.counts[kind] += 1
            error: str | None = None
            if config.outage:
                error = "ServiceUnavailable" if config.outage_mode == "error" else "refuse"
            elif config.error_kinds is None or kind in config.error_kinds:
                draw = self.random.random()
                if draw < config.error_rate:
                    error = "SlowDown"
                elif draw < config.error_rate + config.internal_error_rate:
                    error = "InternalError"
            if error is not None:
                self.throttled[kind] += 1
            return config, error

    def current(self) -> ProxyConfig:
        """The config in force (it is replaced as a whole, never changed in place)."""
        with self.lock:
            return self.config

    def take_corruption(self) -> bool:
        """Whether this GET answer is one of the ``corrupt_gets`` still to corrupt."""
        with self.lock:
            corrupt = self.corrupt_left > 0
            self.corrupt_left -= int(corrupt)
            return corrupt

    def record(self, kind: str, key: str, status: int, sent: int, received: int) -> None:
        with self.lock:
            self.bytes_in += sent
            self.bytes_out += received
            self.log.append(LogEntry(time.time(), kind, key, status))

    def stats(self) -> dict[str, Any]:
        with self.lock:
            counts = {kind: self.counts.get(kind, 0) for kind in KINDS}
            counts["THROTTLED"] = sum(self.throttled.values())
            return {
                "upstream": self.upstream,
                "counts": counts,
                "throttled": {k: v for k, v in self.throttled.items() if v},
                "bytes_in": self.bytes_in,
                "bytes_out": self.bytes_out,
                "config": self.config.to_json(),
                "log_entries": len(self.log),
            }

    def log_entries(self) -> list[LogEntry]:
        with self.lock:
            return list(self.log)

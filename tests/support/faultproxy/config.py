"""The proxy's settings: what it does to requests, replaced as a whole at runtime."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from .kinds import KINDS

__all__ = ["OUTAGE_MODES", "ProxyConfig", "config_changes"]

OUTAGE_MODES = ("error", "refuse")


@dataclass(frozen=True)
class ProxyConfig:
    """What the proxy does to requests; replaced atomically by ``FaultProxy.set``."""

    latency: float = 0.0
    """Seconds added to every S3 request before it is forwarded or failed."""
    error_rate: float = 0.0
    """Fraction of (eligible) requests answered ``503 SlowDown`` without forwarding."""
    internal_error_rate: float = 0.0
    """Fraction of (eligible) requests answered ``500 InternalError`` without forwarding."""
    error_kinds: frozenset[str] | None = None
    """Kinds eligible for injected errors; ``None`` means every kind."""
    outage: bool = False
    """When true every S3 request fails (see ``outage_mode``)."""
    outage_mode: str = "error"
    """``error``: answer ``503 ServiceUnavailable``; ``refuse``: reset the connection."""
    seed: int | None = None
    """Seed of the random choice of failed requests (``None``: unpredictable)."""
    response_delay: float = 0.0
    """Seconds the answer of a forwarded request is held after the upstream gave it: the
    request has taken effect (an object landed) while its client has not heard yet."""
    corrupt_gets: int = 0
    """The next this many GET answers (status 200) have one byte of their body flipped: a
    download corrupted on the way, which only a checksum can catch."""
    opaque_etags: bool = False
    """When true every ``ETag`` response header is replaced by one that is not the MD5 of
    the body, as SSE-KMS, SSE-C and many S3-compatible stores answer."""

    def validate(self) -> ProxyConfig:
        for name in ("latency", "response_delay", "corrupt_gets"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("error_rate", "internal_error_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be within [0, 1], got {value}")
        if self.error_rate + self.internal_error_rate > 1.0:
            raise ValueError("error_rate + internal_error_rate must not exceed 1")
        if self.outage_mode not in OUTAGE_MODES:
            raise ValueError(f"outage_mode must be one of {OUTAGE_MODES}")
        if self.error_kinds is not None:
            unknown = set(self.error_kinds) - set(KINDS)
            if unknown:
                raise ValueError(f"unknown request kinds {sorted(unknown)}; known: {KINDS}")
        return self

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["error_kinds"] = sorted(self.error_kinds) if self.error_kinds is not None else None
        return data


def config_changes(changes: dict[str, Any]) -> dict[str, Any]:
    """Check the names of runtime changes and bring JSON values to the field types."""
    known = {f for f in ProxyConfig.__dataclass_fields__}
    unknown = set(changes) - known
    if unknown:
        raise ValueError(f"unknown proxy settings {sorted(unknown)}; known: {sorted(known)}")
    out = dict(changes)
    if "error_kinds" in out and out["error_kinds"] is not None:
        kinds = out["error_kinds"]
        out["error_kinds"] = frozenset([kinds] if isinstance(kinds, str) else kinds)
    for name in ("latency", "response_delay", "error_rate", "internal_error_rate"):
        if name in out:
            out[name] = float(out[name])
    return out

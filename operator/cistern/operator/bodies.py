"""What the operator reads out of the objects it is handed: a WriteCache's spec (or None
when it is invalid) and drain timeout, a Secret's values."""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any

from cistern.config import ConfigError, DrainPolicy
from cistern.writecache import WriteCacheSpec

__all__ = ["decode_secret", "drain_timeout", "valid_spec"]


def decode_secret(secret: Mapping[str, Any]) -> dict[str, str]:
    return {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}


def valid_spec(body: Mapping[str, Any]) -> WriteCacheSpec | None:
    """The WriteCache's spec, or None when it does not parse."""
    try:
        return WriteCacheSpec.from_dict(body.get("spec") or {})
    except ConfigError:
        return None


def drain_timeout(body: Mapping[str, Any]) -> float:
    """``spec.drain.timeout`` as written (the default for an invalid spec), not yet bounded
    by the cluster's ``maxDrainTimeout``."""
    spec = valid_spec(body)
    return DrainPolicy().timeout if spec is None else spec.drain.timeout

"""Pure helpers for idempotent, observation-based applies of the objects the operator owns.

The operator never PUTs. It compares what it wants (``desired``) with what the API server has
(``current``) and sends a JSON merge patch (RFC 7386) only when they differ. Fields the server
adds (defaults, status, managed metadata) do not count as a difference: the check is "is
``desired`` contained in ``current``". Fields the operator set before and no longer wants are
removed with ``null``, using the previous desired state it keeps in an annotation.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

__all__ = ["LAST_APPLIED", "contains", "fingerprint", "merge_patch"]

LAST_APPLIED = "cistern.dev/last-applied"


def fingerprint(value: Any) -> str:
    """A short, stable hash of a JSON-able value (e.g. a rendered node config)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def contains(current: Any, desired: Any) -> bool:
    """True when every field of ``desired`` is present and equal in ``current``.

    Dicts are compared key by key (extra keys in ``current`` are server defaults); lists must
    have the same length and contain each other element-wise.
    """
    if isinstance(desired, Mapping):
        return isinstance(current, Mapping) and all(
            key in current and contains(current[key], value) for key, value in desired.items())
    if isinstance(desired, list):
        return (isinstance(current, list) and len(current) == len(desired)
                and all(contains(c, d) for c, d in zip(current, desired, strict=True)))
    return bool(current == desired and type(current) is type(desired)) or (
        isinstance(current, int | float) and isinstance(desired, int | float)
        and not isinstance(current, bool) and not isinstance(desired, bool)
        and current == desired)


def merge_patch(current: Mapping[str, Any], desired: Mapping[str, Any],
                previous: Mapping[str, Any] | None) -> dict[str, Any]:
    """A merge patch turning ``current`` into something that contains ``desired``.

    Keys in ``previous`` (what was applied last time) but not in ``desired`` become ``None``
    (deleted). Returns ``{}`` when nothing needs to change.
    """
    patch: dict[str, Any] = {}
    previous = previous or {}
    for key, value in desired.items():
        have = current.get(key)
        if isinstance(value, Mapping) and isinstance(have, Mapping) and value:
            before = previous.get(key)
            sub = merge_patch(have, value, before if isinstance(before, Mapping) else None)
            if sub:
                patch[key] = sub
        elif key not in current or not contains(have, value):
            patch[key] = value
    for key in previous:
        if key not in desired and key in current:
            patch[key] = None
    return patch

"""Why a spec cannot be rolled out now, and how the operator tells the user (Events).

``Problem`` is raised by the reconciler's parts and translated by the handlers into
``kopf.TemporaryError`` / ``kopf.PermanentError``; ``EventSink`` posts a Kubernetes Event.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["EventSink", "Problem"]

#: ``(body, type, reason, message)`` -> posts a Kubernetes Event about ``body``.
EventSink = Callable[[Mapping[str, Any], str, str, str], None]


class Problem(Exception):
    """A reason the latest spec cannot be rolled out now; ``temporary`` if retrying can help."""

    def __init__(self, reason: str, message: str, temporary: bool, delay: float = 30.0) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.temporary = temporary
        self.delay = delay

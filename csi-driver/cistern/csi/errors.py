"""The CSI error boundary: domain errors carry their gRPC status code; one decorator aborts.

Servicer methods raise :class:`CSIError` subclasses and never touch ``context.abort`` or
``context.set_code`` themselves; :func:`grpc_boundary` turns the exception into the call's
status. Anything else that escapes is a bug: it is logged with its traceback and becomes
``INTERNAL``.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import grpc

__all__ = [
    "Aborted",
    "AlreadyExists",
    "CSIError",
    "FailedPrecondition",
    "InvalidArgument",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "ResourceExhausted",
    "Unavailable",
    "grpc_boundary",
]

log = logging.getLogger(__name__)


class CSIError(Exception):
    """A failure the CSI spec gives a status code to; the message is shown to the user."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(CSIError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(CSIError):
    code = grpc.StatusCode.NOT_FOUND


class PermissionDenied(CSIError):
    code = grpc.StatusCode.PERMISSION_DENIED


class AlreadyExists(CSIError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(CSIError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(CSIError):
    code = grpc.StatusCode.ABORTED


class OutOfRange(CSIError):
    code = grpc.StatusCode.OUT_OF_RANGE


class ResourceExhausted(CSIError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(CSIError):
    code = grpc.StatusCode.UNAVAILABLE


F = TypeVar("F", bound=Callable[..., Any])


def _abort(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    context.abort(code, message)
    raise AssertionError("grpc context.abort returned")  # pragma: no cover


def grpc_boundary(method: F) -> F:
    """Wrap a servicer method ``(self, request, context)``: CSIError -> its status code."""

    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except CSIError as exc:
            log.warning("%s failed: %s: %s", method.__name__, exc.code.name, exc.message)
            _abort(context, exc.code, exc.message)
        except Exception as exc:
            log.exception("%s failed unexpectedly", method.__name__)
            _abort(context, grpc.StatusCode.INTERNAL,
                   f"{method.__name__}: internal error: {type(exc).__name__}: {exc}")

    return wrapper  # type: ignore[return-value]

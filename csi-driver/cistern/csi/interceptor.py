"""A gRPC server interceptor that logs every CSI call without its secrets.

Fields the spec marks ``[(csi_secret) = true]`` (found from the descriptors, so new secret
fields are covered without code changes) and mount flags (which the spec says may be
sensitive) are replaced by ``***`` before a message is formatted.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf import text_format
from google.protobuf.message import Message

from cistern.csi.proto import csi_pb2

__all__ = ["LoggingInterceptor", "redact"]

log = logging.getLogger(__name__)
REDACTED = "***"
_SENSITIVE_NAMES = {"mount_flags"}


def _redact_in_place(message: Message) -> None:
    for field, value in message.ListFields():
        secret = field.GetOptions().Extensions[csi_pb2.csi_secret]
        is_map = field.message_type is not None and field.message_type.GetOptions().map_entry
        if secret or field.name in _SENSITIVE_NAMES:
            if is_map:
                for key in list(value):
                    value[key] = REDACTED
            elif field.is_repeated:
                value[:] = [REDACTED] * len(value)
            else:
                setattr(message, field.name, REDACTED)
        elif field.message_type is not None and not is_map:
            if field.is_repeated:
                for item in value:
                    _redact_in_place(item)
            else:
                _redact_in_place(value)


def redact(message: Message) -> Message:
    """A copy of ``message`` with every secret value replaced by ``***``."""
    copy = type(message)()
    copy.CopyFrom(message)
    _redact_in_place(copy)
    return copy


class _Formatted:
    """Formats a message only if the log line is emitted."""

    def __init__(self, message: Message) -> None:
        self.message = message

    def __str__(self) -> str:
        return text_format.MessageToString(redact(self.message), as_one_line=True) or "{}"


class LoggingInterceptor(grpc.ServerInterceptor):
    def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Any],
                          handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        inner = handler.unary_unary
        method = handler_call_details.method.rsplit("/", 1)[-1]

        def logged(request: Message, context: grpc.ServicerContext) -> Any:
            start = time.monotonic()
            log.info("%s call: %s", method, _Formatted(request))
            try:
                response = inner(request, context)
            except Exception:
                code = context.code() if hasattr(context, "code") else None
                log.info("%s failed after %.3fs: %s", method, time.monotonic() - start,
                         getattr(code, "name", code))
                raise
            log.info("%s ok after %.3fs: %s", method, time.monotonic() - start,
                     _Formatted(response))
            return response

        return grpc.unary_unary_rpc_method_handler(
            logged, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)

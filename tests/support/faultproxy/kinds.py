"""What kind of S3 request a path-style request is (the proxy counts, logs and fails by kind)."""

from __future__ import annotations

import urllib.parse
from typing import Any

__all__ = ["KINDS", "classify"]

KINDS = (
    "PUT", "PART", "CREATE_MPU", "COMPLETE_MPU", "ABORT_MPU", "COPY",
    "DELETE", "GET", "HEAD", "LIST", "OTHER",
)


def classify(method: str, path: str, query: str, headers: Any) -> tuple[str, str, str]:
    """Return ``(kind, bucket, key)`` of a path-style S3 request."""
    parts = urllib.parse.unquote(path.lstrip("/")).split("/", 1)
    bucket = parts[0]
    key = parts[1] if len(parts) > 1 else ""
    params = urllib.parse.parse_qs(query, keep_blank_values=True)
    method = method.upper()
    if method == "PUT":
        if not key:
            return "OTHER", bucket, key
        if headers.get("x-amz-copy-source"):
            return "COPY", bucket, key
        if "partNumber" in params and "uploadId" in params:
            return "PART", bucket, key
        if params.keys() & {"tagging", "acl", "retention", "legal-hold"}:
            return "OTHER", bucket, key
        return "PUT", bucket, key
    if method == "POST":
        if "uploads" in params:
            return "CREATE_MPU", bucket, key
        if "uploadId" in params:
            return "COMPLETE_MPU", bucket, key
        if "delete" in params:
            return "DELETE", bucket, key
        return "OTHER", bucket, key
    if method == "DELETE":
        if "uploadId" in params:
            return "ABORT_MPU", bucket, key
        return ("DELETE" if key else "OTHER"), bucket, key
    if method == "GET":
        if not key:
            if not bucket or "list-type" in params or "uploads" in params or "versions" in params:
                return "LIST", bucket, key
            if params.keys() - {"prefix", "delimiter", "marker", "max-keys", "encoding-type"}:
                return "OTHER", bucket, key
            return "LIST", bucket, key
        if "uploadId" in params:
            return "LIST", bucket, key
        return "GET", bucket, key
    if method == "HEAD":
        return "HEAD", bucket, key
    return "OTHER", bucket, key

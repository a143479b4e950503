"""Object keys ↔ paths in the cache namespace: confined, bounded, no surprises.

A key names a file by its path below the namespace root. Keys that a file system cannot hold
the same way (empty segments, ``.``/``..``, NUL, over-long names) are refused instead of being
normalised into another key, so a key always reads back as itself.
"""

from __future__ import annotations

from cistern.cachenode.s3api.errors import S3Error

__all__ = ["MAX_KEY_BYTES", "TEMP_PREFIX", "is_internal_name", "split_key"]

MAX_KEY_BYTES = 1024
"""S3's own limit on key length (UTF-8 bytes)."""
NAME_MAX = 255
TEMP_PREFIX = ".cistern-s3."
"""Names the endpoint uses for objects being written; hidden from listings, refused as keys."""


def is_internal_name(name: str) -> bool:
    return name.startswith(TEMP_PREFIX)


def split_key(key: str, *, allow_dir: bool = False) -> list[str]:
    """The path segments of ``key``; raise ``S3Error`` for a key the namespace cannot hold.

    With ``allow_dir`` a trailing ``/`` (a "directory marker" key) is accepted and dropped.
    """
    if not key:
        raise S3Error("InvalidArgument", "An object key must not be empty.")
    if len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        raise S3Error("KeyTooLongError", "Your key is too long.", resource=key[:64])
    if "\0" in key:
        raise S3Error("InvalidArgument", "An object key must not contain NUL.")
    if allow_dir and key.endswith("/"):
        key = key[:-1]
    parts = key.split("/")
    for part in parts:
        if part in ("", ".", ".."):
            raise S3Error("InvalidArgument", "This endpoint stores keys as paths: empty, '.' "
                          "and '..' segments are not allowed.", resource=key)
        if len(part.encode("utf-8", "surrogatepass")) > NAME_MAX:
            raise S3Error("KeyTooLongError", "A key segment is longer than 255 bytes.",
                          resource=key[:64])
        if is_internal_name(part):
            raise S3Error("InvalidArgument", f"Key segments starting with {TEMP_PREFIX!r} "
                          "are reserved.", resource=key)
    return parts

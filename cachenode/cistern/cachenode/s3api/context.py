"""What every handler gets: the parsed request, its verified signature, and the endpoint's
shared parts (objects, staging, the blocking-call pool)."""

from __future__ import annotations

import asyncio
import email.utils
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import quote

from aiohttp import web

from cistern.cachenode.s3api.errors import S3Error
from cistern.cachenode.s3api.multipart import UploadStaging
from cistern.cachenode.s3api.objects import CacheObjects
from cistern.cachenode.s3api.payload import Payload
from cistern.cachenode.s3api.sigv4 import AuthResult
from cistern.cachenode.s3api.xmlio import MAX_XML_BYTES

__all__ = ["MAX_OBJECT_SIZE", "Context", "Shared", "http_date"]

T = TypeVar("T")

MAX_OBJECT_SIZE = 5 * 2**30
"""The largest single PUT or part, as in S3 (bigger objects: multipart, up to 10,000 parts)."""
XML_TYPE = "application/xml"


def http_date(mtime_ns: int) -> str:
    return email.utils.formatdate(mtime_ns / 1e9, usegmt=True)


@dataclass
class Shared:
    objects: CacheObjects
    staging: UploadStaging
    bucket: str
    pool: ThreadPoolExecutor

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking call (cache core, disk) on the pool, never on the loop."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)


@dataclass
class Context:
    request: web.Request
    shared: Shared
    bucket: str
    key: str
    query: dict[str, str]
    headers: dict[str, list[str]]
    auth: AuthResult
    request_id: str

    def header(self, name: str) -> str:
        return (self.headers.get(name) or [""])[0]

    def payload(self, limit: int = MAX_OBJECT_SIZE) -> Payload:
        return Payload(self.request.content, self.headers, self.auth, limit)

    async def small_body(self) -> bytes:
        """A bounded XML request body, with its signature/digests checked."""
        if not self.header("content-length") and "aws-chunked" not in \
                self.header("content-encoding") and not self.auth.payload.startswith("STREAM"):
            return b""  # no body at all (some clients send no Content-Length: 0)
        return await self.payload(MAX_XML_BYTES).read_all()

    def xml(self, body: bytes, status: int = 200) -> web.Response:
        return web.Response(body=body, status=status, content_type=XML_TYPE,
                            headers={"x-amz-request-id": self.request_id})

    def empty(self, status: int = 200, **headers: str) -> web.Response:
        return web.Response(status=status, headers={"x-amz-request-id": self.request_id,
                                                    **headers})

    def int_param(self, name: str, default: int, low: int, high: int) -> int:
        raw = self.query.get(name)
        if raw is None or raw == "":
            return default
        try:
            value = int(raw)
        except ValueError:
            raise S3Error("InvalidArgument", f"{name} must be an integer.") from None
        if not low <= value <= high:
            raise S3Error("InvalidArgument", f"{name} must be between {low} and {high}.")
        return value

    def encode(self, text: str) -> str:
        """Keys in list responses, URL-encoded when the client asked for it."""
        return quote(text, safe="/") if self.query.get("encoding-type") == "url" else text

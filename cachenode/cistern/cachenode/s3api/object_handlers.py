"""Object operations: PUT, GET (ranges), HEAD, DELETE, CopyObject."""

from __future__ import annotations

import hashlib
import logging
import os
import re
from urllib.parse import unquote

from aiohttp import web

from cistern.cachenode.core import Attr
from cistern.cachenode.s3api.context import Context, http_date
from cistern.cachenode.s3api.errors import S3Error
from cistern.cachenode.s3api.objects import ObjectWriter
from cistern.cachenode.s3api.payload import Payload
from cistern.cachenode.s3api.xmlio import document, fields, iso_time

__all__ = ["copy_object", "delete_object", "get_object", "put_object", "write_body"]

log = logging.getLogger(__name__)

READ_BLOCK = 1 << 20
WRITE_BATCH = 1 << 20
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
_EMPTY_MD5 = hashlib.md5(b"").hexdigest()


async def write_body(ctx: Context, payload: Payload, write: ObjectWriter | int) -> None:
    """Stream the request body into an object writer or a file descriptor, in 1 MiB batches
    (each batch one blocking call on the pool)."""
    buf = bytearray()
    offset = 0

    def consume(data: bytes, at: int) -> None:
        payload.digest(data)
        if isinstance(write, ObjectWriter):
            write.write(data)
            return
        view = memoryview(data)
        while view:
            n = os.pwrite(write, view, at)
            view, at = view[n:], at + n

    async def flush() -> None:
        nonlocal offset
        data = bytes(buf)
        buf.clear()
        await ctx.shared.run(consume, data, offset)
        offset += len(data)

    async for data in payload.chunks():
        buf += data
        if len(buf) >= WRITE_BATCH:
            await flush()
    if buf:
        await flush()
    payload.finish()


def _object_headers(ctx: Context, attr: Attr) -> dict[str, str]:
    return {
        "ETag": ctx.shared.objects.etag(ctx.key, attr),
        "Last-Modified": http_date(attr.mtime_ns),
        "Accept-Ranges": "bytes",
        "Content-Type": "binary/octet-stream",
        "x-amz-request-id": ctx.request_id,
    }


async def put_object(ctx: Context) -> web.StreamResponse:
    if ctx.header("if-none-match") or ctx.header("if-match"):
        raise S3Error("NotImplemented", "Conditional writes are not supported by this "
                      "endpoint.")
    if ctx.key.endswith("/"):
        try:
            await ctx.payload(limit=0).read_all()
        except S3Error as exc:
            if exc.code != "EntityTooLarge":
                raise
            raise S3Error("InvalidArgument", "A key ending in '/' names a directory here "
                          "and cannot hold data.", resource=ctx.key) from None
        await ctx.shared.run(ctx.shared.objects.make_dir, ctx.key)
        return ctx.empty(ETag=f'"{_EMPTY_MD5}"')
    payload = ctx.payload()
    writer = await ctx.shared.run(ctx.shared.objects.begin, ctx.key)
    try:
        await write_body(ctx, payload, writer)
        etag = f'"{payload.md5.hexdigest()}"'
        await ctx.shared.run(writer.commit, etag)
    except BaseException:
        await ctx.shared.run(writer.abort)
        raise
    return ctx.empty(ETag=etag)


def _parse_range(value: str, size: int) -> tuple[int, int] | None:
    """(start, end inclusive) of a single byte range, None to serve the whole object."""
    m = _RANGE.match(value.strip())
    if m is None:
        return None  # multiple or malformed ranges: S3 serves the whole object
    first, last = m.groups()
    if first == "" and last == "":
        return None
    if first == "":
        length = int(last)
        if length == 0 or size == 0:
            raise S3Error("InvalidRange", "The requested range is not satisfiable")
        return max(0, size - length), size - 1
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if start >= size or (last and int(last) < start):
        raise S3Error("InvalidRange", "The requested range is not satisfiable")
    return start, end


def _check_conditions(ctx: Context, etag: str) -> web.Response | None:
    wanted = ctx.header("if-match")
    if wanted and wanted.strip() != "*" and etag not in [w.strip() for w in wanted.split(",")]:
        raise S3Error("PreconditionFailed", "At least one of the pre-conditions you specified "
                      "did not hold")
    unwanted = ctx.header("if-none-match")
    if unwanted and (unwanted.strip() == "*"
                     or etag in [w.strip() for w in unwanted.split(",")]):
        return ctx.empty(304, ETag=etag)
    return None


async def get_object(ctx: Context, *, head: bool = False) -> web.StreamResponse:
    objects = ctx.shared.objects
    if head:
        attr = await ctx.shared.run(objects.lookup, ctx.key)
        if attr is None:
            raise S3Error("NoSuchKey", "The specified key does not exist.", resource=ctx.key)
        headers = _object_headers(ctx, attr)
        not_modified = _check_conditions(ctx, headers["ETag"])
        if not_modified is not None:
            return not_modified
        headers["Content-Length"] = str(attr.size)
        return web.Response(status=200, headers=headers)
    handle, attr = await ctx.shared.run(objects.open, ctx.key)
    try:
        headers = _object_headers(ctx, attr)
        not_modified = _check_conditions(ctx, headers["ETag"])
        if not_modified is not None:
            return not_modified
        status = 200
        start, end = 0, attr.size - 1
        wanted = ctx.header("range")
        if wanted:
            chosen = _parse_range(wanted, attr.size)
            if chosen is not None:
                start, end = chosen
                status = 206
                headers["Content-Range"] = f"bytes {start}-{end}/{attr.size}"
        length = max(0, end - start + 1)
        response = web.StreamResponse(status=status, headers=headers)
        response.content_length = length
        await response.prepare(ctx.request)
        offset = start
        try:
            while offset <= end:
                data = await ctx.shared.run(objects.read, handle, offset,
                                            min(READ_BLOCK, end + 1 - offset))
                if not data:
                    break  # the file shrank under us; the client sees a short body
                await response.write(data)
                offset += len(data)
        except OSError as exc:
            # The status line is sent: no error document can follow. Cut the connection so
            # the client sees a short body, never a silently truncated object.
            log.error("s3 GET %s: read failed after %d bytes: %s", ctx.key, offset - start, exc)
            raise ConnectionResetError(str(exc)) from exc
        await response.write_eof()
        return response
    finally:
        await ctx.shared.run(objects.close, handle)


async def delete_object(ctx: Context) -> web.StreamResponse:
    await ctx.shared.run(ctx.shared.objects.delete, ctx.key)
    await ctx.shared.run(ctx.shared.objects.sync)  # acknowledged deletes survive a power cut
    return ctx.empty(204)


def _copy_source(ctx: Context) -> str:
    source = unquote(ctx.header("x-amz-copy-source").split("?", 1)[0]).lstrip("/")
    bucket, _, key = source.partition("/")
    if bucket != ctx.shared.bucket:
        raise S3Error("NoSuchBucket", "The specified bucket does not exist", resource=bucket)
    if not key:
        raise S3Error("InvalidArgument", "Copy Source must mention the source bucket and key: "
                      "sourcebucket/sourcekey.")
    return key


async def copy_object(ctx: Context) -> web.StreamResponse:
    """CopyObject within the cache: an in-kernel copy of the source's data file."""
    source = _copy_source(ctx)
    if source == ctx.key and ctx.header("x-amz-metadata-directive").upper() != "REPLACE":
        raise S3Error("InvalidRequest", "This copy request is illegal because it is trying to "
                      "copy an object to itself without changing the object's metadata.")
    objects = ctx.shared.objects
    handle, attr = await ctx.shared.run(objects.open, source)
    try:
        etag = objects.etag(source, attr)
        writer = await ctx.shared.run(objects.begin, ctx.key)
        try:
            await ctx.shared.run(writer.copy_from, handle.fd, attr.size)
            new = await ctx.shared.run(writer.commit, etag)
        except BaseException:
            await ctx.shared.run(writer.abort)
            raise
    finally:
        await ctx.shared.run(objects.close, handle)
    return ctx.xml(document("CopyObjectResult", [
        fields(LastModified=iso_time(new.mtime_ns / 1e9), ETag=etag)]))

"""Multipart uploads: Create, UploadPart, Complete, Abort, ListParts, ListMultipartUploads."""

from __future__ import annotations

import os

from aiohttp import web

from cistern.cachenode.s3api.context import Context
from cistern.cachenode.s3api.errors import S3Error
from cistern.cachenode.s3api.keys import split_key
from cistern.cachenode.s3api.multipart import MAX_PART_NUMBER, Part, Upload
from cistern.cachenode.s3api.object_handlers import write_body
from cistern.cachenode.s3api.xmlio import document, fields, iso_time, parse_complete

__all__ = ["abort_upload", "complete_upload", "create_upload", "list_parts", "list_uploads",
           "upload_part"]

_OWNER = "<Owner><ID>cistern</ID><DisplayName>cistern</DisplayName></Owner>"


async def create_upload(ctx: Context) -> web.StreamResponse:
    split_key(ctx.key)
    await ctx.small_body()
    upload_id = await ctx.shared.run(ctx.shared.staging.create, ctx.key)
    return ctx.xml(document("InitiateMultipartUploadResult", [
        fields(Bucket=ctx.bucket, Key=ctx.key, UploadId=upload_id)]))


async def _upload(ctx: Context) -> Upload:
    return await ctx.shared.run(ctx.shared.staging.get, ctx.query.get("uploadId", ""), ctx.key)


async def upload_part(ctx: Context) -> web.StreamResponse:
    if ctx.header("x-amz-copy-source"):
        raise S3Error("NotImplemented", "UploadPartCopy is not supported by this endpoint.")
    number = ctx.int_param("partNumber", 0, 1, MAX_PART_NUMBER)
    upload = await _upload(ctx)
    staging = ctx.shared.staging
    payload = ctx.payload()
    fd, tmp = await ctx.shared.run(staging.begin_part, upload, number)
    try:
        await write_body(ctx, payload, fd)
    except BaseException:
        await ctx.shared.run(staging.discard_part, fd, tmp)
        raise
    etag = await ctx.shared.run(staging.commit_part, upload, number, fd, tmp,
                                payload.md5.hexdigest())
    return ctx.empty(ETag=etag)


def _assemble(ctx: Context, upload: Upload, parts: list[Part], etag: str) -> None:
    """Blocking: copy the parts into the object's temporary file in the kernel, commit it,
    then drop the staged parts."""
    writer = ctx.shared.objects.begin(ctx.key)
    try:
        for part in parts:
            fd = os.open(part.path, os.O_RDONLY)
            try:
                writer.copy_from(fd, part.size)
            finally:
                os.close(fd)
        writer.commit(etag)
    except BaseException:
        writer.abort()
        raise
    ctx.shared.staging.remove(upload.upload_id)


async def complete_upload(ctx: Context) -> web.StreamResponse:
    upload = await _upload(ctx)
    wanted = parse_complete(await ctx.small_body())
    parts, etag = await ctx.shared.run(ctx.shared.staging.plan, upload, wanted)
    await ctx.shared.run(_assemble, ctx, upload, parts, etag)
    return ctx.xml(document("CompleteMultipartUploadResult", [
        fields(Location=f"/{ctx.bucket}/{ctx.key}", Bucket=ctx.bucket, Key=ctx.key,
               ETag=etag)]))


async def abort_upload(ctx: Context) -> web.StreamResponse:
    upload = await _upload(ctx)
    await ctx.shared.run(ctx.shared.staging.remove, upload.upload_id)
    return ctx.empty(204)


async def list_parts(ctx: Context) -> web.StreamResponse:
    upload = await _upload(ctx)
    max_parts = ctx.int_param("max-parts", 1000, 0, 1000)
    marker = ctx.int_param("part-number-marker", 0, 0, MAX_PART_NUMBER)
    parts = [p for p in await ctx.shared.run(ctx.shared.staging.parts, upload)
             if p.number > marker]
    shown, truncated = parts[:max_parts], len(parts) > max_parts
    body = [fields(Bucket=ctx.bucket, Key=ctx.key, UploadId=upload.upload_id,
                   PartNumberMarker=marker,
                   NextPartNumberMarker=shown[-1].number if shown else marker,
                   MaxParts=max_parts, IsTruncated=truncated, StorageClass="STANDARD"),
            _OWNER.replace("Owner", "Initiator"), _OWNER]
    for part in shown:
        body.append("<Part>" + fields(PartNumber=part.number, LastModified=iso_time(part.mtime),
                                      ETag=part.etag, Size=part.size) + "</Part>")
    return ctx.xml(document("ListPartsResult", body))


async def list_uploads(ctx: Context) -> web.StreamResponse:
    prefix = ctx.query.get("prefix", "")
    max_uploads = ctx.int_param("max-uploads", 1000, 0, 1000)
    uploads = [u for u in await ctx.shared.run(ctx.shared.staging.uploads)
               if u.key.startswith(prefix)]
    shown = uploads[:max_uploads]
    body = [fields(Bucket=ctx.bucket, Prefix=ctx.encode(prefix), MaxUploads=max_uploads,
                   IsTruncated=len(uploads) > max_uploads)]
    for upload in shown:
        body.append("<Upload>" + fields(Key=ctx.encode(upload.key), UploadId=upload.upload_id,
                                        Initiated=iso_time(upload.initiated),
                                        StorageClass="STANDARD") + "</Upload>")
    return ctx.xml(document("ListMultipartUploadsResult", body))

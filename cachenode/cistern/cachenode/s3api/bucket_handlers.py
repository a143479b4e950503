"""Bucket-level operations: ListObjects(V2), DeleteObjects, ListBuckets and the small probes
clients make before they start (HeadBucket, GetBucketLocation, CreateBucket of this bucket)."""

from __future__ import annotations

import time

from aiohttp import web

from cistern.cachenode.s3api.context import Context
from cistern.cachenode.s3api.errors import S3Error, from_oserror
from cistern.cachenode.s3api.listing import decode_token, encode_token, list_page
from cistern.cachenode.s3api.xmlio import document, fields, iso_time, parse_delete

__all__ = ["delete_objects", "list_buckets", "list_objects"]

_OWNER = "<Owner><ID>cistern</ID><DisplayName>cistern</DisplayName></Owner>"
_STARTED = time.time()


async def list_buckets(ctx: Context) -> web.StreamResponse:
    return ctx.xml(document("ListAllMyBucketsResult", [
        _OWNER, "<Buckets><Bucket>" + fields(Name=ctx.shared.bucket,
                                             CreationDate=iso_time(_STARTED))
        + "</Bucket></Buckets>"]))


async def list_objects(ctx: Context) -> web.StreamResponse:
    v2 = ctx.query.get("list-type") == "2"
    prefix = ctx.query.get("prefix", "")
    delimiter = ctx.query.get("delimiter", "")
    max_keys = ctx.int_param("max-keys", 1000, 0, 2**31 - 1)
    if v2:
        token = ctx.query.get("continuation-token")
        start_after = ctx.query.get("start-after", "")
        marker = decode_token(token) if token else start_after
    else:
        marker = ctx.query.get("marker", "")
    page = await ctx.shared.run(lambda: list_page(ctx.shared.objects, prefix=prefix,
                                                  delimiter=delimiter, marker=marker,
                                                  max_keys=max_keys))
    enc = ctx.encode
    head = dict(Name=ctx.bucket, Prefix=enc(prefix))
    if v2:
        head.update(KeyCount=str(len(page.contents) + len(page.prefixes)))
        if ctx.query.get("continuation-token"):
            head["ContinuationToken"] = ctx.query["continuation-token"]
        if page.truncated and page.last is not None:
            head["NextContinuationToken"] = encode_token(page.last)
        if ctx.query.get("start-after"):
            head["StartAfter"] = enc(ctx.query["start-after"])
    else:
        head["Marker"] = enc(marker)
        if page.truncated and page.last is not None:
            head["NextMarker"] = enc(page.last)
    head["MaxKeys"] = str(min(max_keys, 1000))
    if delimiter:
        head["Delimiter"] = enc(delimiter)
    if ctx.query.get("encoding-type") == "url":
        head["EncodingType"] = "url"
    body = [fields(**head), fields(IsTruncated=page.truncated)]
    objects = ctx.shared.objects
    for key, attr in page.contents:
        body.append("<Contents>" + fields(Key=enc(key), LastModified=iso_time(
            attr.mtime_ns / 1e9), ETag=objects.etag(key, attr), Size=attr.size,
            StorageClass="STANDARD") + "</Contents>")
    for common in page.prefixes:
        body.append("<CommonPrefixes>" + fields(Prefix=enc(common)) + "</CommonPrefixes>")
    return ctx.xml(document("ListBucketResult", body))


async def delete_objects(ctx: Context) -> web.StreamResponse:
    keys, quiet = parse_delete(await ctx.small_body())
    body = []
    for key in keys:
        try:
            await ctx.shared.run(ctx.shared.objects.delete, key)
        except (S3Error, OSError) as exc:
            err = exc if isinstance(exc, S3Error) else from_oserror(exc, key)
            body.append("<Error>" + fields(Key=key, Code=err.code, Message=err.message)
                        + "</Error>")
            continue
        if not quiet:
            body.append("<Deleted>" + fields(Key=key) + "</Deleted>")
    await ctx.shared.run(ctx.shared.objects.sync)  # one journal sync for the whole batch
    return ctx.xml(document("DeleteResult", body))

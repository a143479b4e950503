"""The S3 endpoint: aiohttp serving path-style requests on a TCP address and/or a unix socket.

It runs its own asyncio loop on one thread (the FUSE front end owns the main thread); every
call into the cache core or the disk goes to a bounded thread pool. ``_handle`` is the one
error boundary: ``S3Error`` and the core's ``OSError`` become S3 XML errors there.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import secrets
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import unquote

from aiohttp import web

from cistern.cachenode.core import CacheCore
from cistern.cachenode.s3api import bucket_handlers as buckets
from cistern.cachenode.s3api import multipart_handlers as multipart
from cistern.cachenode.s3api import object_handlers as objects
from cistern.cachenode.s3api.context import Context, Shared
from cistern.cachenode.s3api.errors import S3Error, error_xml, from_oserror
from cistern.cachenode.s3api.multipart import UploadStaging
from cistern.cachenode.s3api.objects import CacheObjects
from cistern.cachenode.s3api.sigv4 import Credential, Verifier
from cistern.cachenode.s3api.xmlio import MAX_XML_BYTES
from cistern.config import parse_hostport
from cistern.nodestatus import S3EndpointStatus

__all__ = ["S3Endpoint"]

log = logging.getLogger(__name__)

Handler = Callable[[Context], Awaitable[web.StreamResponse]]

MAX_CONCURRENT_REQUESTS = 64
POOL_THREADS = 16


def _query(raw: str) -> list[tuple[str, str]]:
    pairs = []
    for item in raw.split("&") if raw else []:
        name, _, value = item.partition("=")
        pairs.append((unquote(name), unquote(value)))
    return pairs


def _route(method: str, key: str, query: dict[str, str], headers: dict[str, list[str]]
           ) -> Handler | None:
    if not key:
        return {
            "GET": buckets.list_objects,
            "POST": buckets.delete_objects if "delete" in query else None,
        }.get(method)
    if method == "PUT":
        if "uploadId" in query:
            return multipart.upload_part
        if headers.get("x-amz-copy-source"):
            return objects.copy_object
        return objects.put_object
    if method == "GET":
        return multipart.list_parts if "uploadId" in query else objects.get_object
    if method == "HEAD":
        return _head_object
    if method == "DELETE":
        return multipart.abort_upload if "uploadId" in query else objects.delete_object
    if method == "POST":
        if "uploads" in query:
            return multipart.create_upload
        if "uploadId" in query:
            return multipart.complete_upload
    return None


async def _head_object(ctx: Context) -> web.StreamResponse:
    return await objects.get_object(ctx, head=True)


class S3Endpoint:
    """The S3-compatible view of one cache namespace (see docs/s3-endpoint.md)."""

    def __init__(self, core: CacheCore, *, bucket: str, credential: Credential,
                 state_dir: Path, listen: str | None = None, socket: str | None = None) -> None:
        self.bucket = bucket
        self.listen = listen
        self.socket = socket
        self._verifier = Verifier(credential)
        self._pool = ThreadPoolExecutor(POOL_THREADS, thread_name_prefix="s3api")
        self._shared = Shared(CacheObjects(core, state_dir), UploadStaging(state_dir), bucket,
                              self._pool)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.port: int | None = None
        self.requests_total = 0
        self.errors_total = 0

    @property
    def url(self) -> str | None:
        if not self.listen or self.port is None:
            return None
        host = parse_hostport(self.listen, "s3Endpoint.listen")[0]
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}"

    def status(self) -> S3EndpointStatus:
        return S3EndpointStatus(url=self.url, socket=self.socket, bucket=self.bucket,
                                requests=self.requests_total, errors=self.errors_total)

    # ---------------------------------------------------------------- lifecycle

    def recover(self) -> None:
        """Remove what a crash left: unfinished objects in the namespace, stale staged
        uploads. Call it before the flusher starts, so no leftover is ever uploaded."""
        self._shared.objects.sweep_leftovers()
        self._shared.staging.expire()

    def start(self, timeout: float = 30.0) -> None:
        """Bind and serve on a thread; raise if binding fails."""
        self._thread = threading.Thread(target=self._thread_main, name="s3-endpoint",
                                        daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError("the S3 endpoint did not start in time")
        if self._error is not None:
            raise self._error
        log.info("S3 endpoint for bucket %s serving at %s%s", self.bucket,
                 self.url or "", f" and unix:{self.socket}" if self.socket else "")

    def stop(self) -> None:
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stop.set)
        if self._thread is not None:
            self._thread.join(30.0)
        # Not waiting: a PUT held by a drain must not hold up the stop; the ETag book's
        # records are advisory and need no orderly close.
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _thread_main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # binding errors reach start(); later ones are logged
            if not self._ready.is_set():
                self._error = exc
                self._ready.set()
            else:
                log.exception("the S3 endpoint stopped on an error")

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._slots = asyncio.Semaphore(MAX_CONCURRENT_REQUESTS)
        # Bodies are streamed by the handlers (request.read() is never used); objects are
        # stored as sent, never decompressed (S3 keeps Content-Encoding'd bodies as they are).
        app = web.Application(client_max_size=MAX_XML_BYTES)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app, access_log=None, handle_signals=False,
                               keepalive_timeout=75.0, auto_decompress=False)
        await runner.setup()
        try:
            if self.listen:
                host, port = parse_hostport(self.listen, "s3Endpoint.listen")
                site = web.TCPSite(runner, host, port, reuse_address=True)
                await site.start()
                server = site._server
                sockets = getattr(server, "sockets", None) or []
                self.port = sockets[0].getsockname()[1] if sockets else port
            if self.socket:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.socket)
                await web.UnixSite(runner, self.socket).start()
                os.chmod(self.socket, 0o666)  # every request is signed; the socket is the door
            self._ready.set()
            await self._stop.wait()
        finally:
            await runner.cleanup()

    # ---------------------------------------------------------------- requests

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        request_id = secrets.token_hex(8).upper()
        resource = request.path
        self.requests_total += 1
        try:
            async with self._slots:
                return await self._dispatch(request, request_id)
        except (asyncio.CancelledError, ConnectionResetError):
            raise  # the client went away, or a response already under way was cut
        except S3Error as exc:
            err = exc
        except OSError as exc:
            err = from_oserror(exc, resource)
            if err.code == "InternalError":
                log.error("s3 %s %s: %s", request.method, resource, exc)
        except Exception:
            log.exception("s3 %s %s failed", request.method, resource)
            err = S3Error("InternalError", "We encountered an internal error. Please try "
                          "again.")
        self.errors_total += 1
        if err.code in ("SignatureDoesNotMatch", "AccessDenied", "InvalidAccessKeyId"):
            log.warning("s3 %s %s refused: %s", request.method, resource, err.code)
        else:
            log.debug("s3 %s %s: %s %s", request.method, resource, err.code, err.message)
        err.resource = err.resource or resource
        return web.Response(status=err.status, body=error_xml(err, request_id),
                            content_type="application/xml",
                            headers={"x-amz-request-id": request_id})

    async def _dispatch(self, request: web.Request, request_id: str) -> web.StreamResponse:
        raw_path, _, raw_query = request.raw_path.partition("?")
        pairs = _query(raw_query)
        headers = {name.lower(): request.headers.getall(name) for name in request.headers}
        auth = self._verifier.verify(request.method, raw_path, pairs, headers,
                                     dt.datetime.now(dt.UTC))
        bucket, _, key = unquote(raw_path).lstrip("/").partition("/")
        query = dict(pairs)
        ctx = Context(request, self._shared, bucket, key, query, headers, auth, request_id)
        if not bucket:
            if request.method != "GET":
                raise S3Error("MethodNotAllowed", "The specified method is not allowed "
                              "against this resource.")
            return await buckets.list_buckets(ctx)
        if bucket != self.bucket:
            raise S3Error("NoSuchBucket", "The specified bucket does not exist",
                          resource=bucket)
        if not key:
            if request.method == "HEAD":
                return ctx.empty(200, **{"x-amz-bucket-region": "us-east-1"})
            if request.method == "PUT":
                return ctx.empty(200, Location=f"/{bucket}")
            if request.method == "GET" and "location" in query:
                return ctx.xml(b'<?xml version="1.0" encoding="UTF-8"?>\n<LocationConstraint '
                               b'xmlns="http://s3.amazonaws.com/doc/2006-03-01/"/>')
            if request.method == "GET" and "uploads" in query:
                return await multipart.list_uploads(ctx)
            if request.method == "GET" and "versioning" in query:
                return ctx.xml(b'<?xml version="1.0" encoding="UTF-8"?>\n'
                               b'<VersioningConfiguration '
                               b'xmlns="http://s3.amazonaws.com/doc/2006-03-01/"/>')
        handler = _route(request.method, key, query, headers)
        if handler is None:
            raise S3Error("NotImplemented", "A header or query you provided implies "
                          "functionality that is not implemented.")
        return await handler(ctx)

"""Request bodies: plain or ``aws-chunked`` (streaming SigV4), bounded, digested, checked.

``Payload.chunks()`` yields the object's bytes as they arrive; the caller feeds them to
``digest`` (on a worker thread: hashing is the costly part) and then ``finish`` checks what
the client declared about the body: the signed SHA-256, chunk signatures, Content-MD5,
the ``x-amz-checksum-*`` value (header or trailer) where the algorithm is in the standard
library (CRC32, SHA-1, SHA-256; CRC32C/CRC64NVME are accepted unchecked). A mismatch raises
``S3Error`` before the caller makes the object visible.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import zlib
from collections.abc import AsyncIterator
from typing import Any, Protocol

from cistern.cachenode.s3api.errors import S3Error
from cistern.cachenode.s3api.sigv4 import STREAMING_MODES, UNSIGNED, AuthResult

__all__ = ["Payload"]

READ_BLOCK = 1 << 20
MAX_CHUNK = 16 << 20
MAX_LINE = 8192
MAX_TRAILERS = 16


class Stream(Protocol):
    async def read(self, n: int = -1) -> bytes: ...
    async def readexactly(self, n: int) -> bytes: ...
    async def readline(self) -> bytes: ...


class _Crc32:
    def __init__(self) -> None:
        self.value = 0

    def update(self, data: bytes) -> None:
        self.value = zlib.crc32(data, self.value)

    def digest(self) -> bytes:
        return self.value.to_bytes(4, "big")


_CHECKSUMS: dict[str, Any] = {"x-amz-checksum-crc32": _Crc32,
                              "x-amz-checksum-sha1": hashlib.sha1,
                              "x-amz-checksum-sha256": hashlib.sha256}


class Payload:
    def __init__(self, stream: Stream, headers: dict[str, list[str]], auth: AuthResult,
                 limit: int) -> None:
        self._stream = stream
        self._headers = headers
        self._auth = auth
        self._limit = limit
        self.size = 0
        self.md5 = hashlib.md5()
        self._sha256 = hashlib.sha256() if auth.payload not in (UNSIGNED, *STREAMING_MODES) \
            else None
        self._checksums = {name: make() for name, make in _CHECKSUMS.items()}
        self._declared: dict[str, str] = {n: self._header(n) for n in _CHECKSUMS
                                          if self._header(n)}
        self._tracked = set(self._declared) | ({self._header("x-amz-trailer").lower()}
                                               & set(_CHECKSUMS))
        encoding = self._header("content-encoding")
        self.chunked = auth.payload in STREAMING_MODES or "aws-chunked" in encoding
        declared = self._header("x-amz-decoded-content-length") if self.chunked \
            else self._header("content-length")
        if not declared and not self.chunked:
            raise S3Error("MissingContentLength", "You must provide the Content-Length HTTP "
                          "header.")
        try:
            self.expected_size = int(declared) if declared else None
        except ValueError:
            raise S3Error("InvalidArgument", "The content length is not a number.") from None
        if self.expected_size is not None and self.expected_size > limit:
            raise S3Error("EntityTooLarge", f"Your proposed upload exceeds the maximum allowed "
                          f"size ({limit} bytes).")

    def _header(self, name: str) -> str:
        return (self._headers.get(name) or [""])[0]

    def _take(self, data: bytes) -> bytes:
        self.size += len(data)
        if self.size > self._limit:
            raise S3Error("EntityTooLarge", "Your upload exceeds the maximum allowed size.")
        return data

    def digest(self, data: bytes) -> None:
        """Feed the digests. Callers pass every byte ``chunks()`` yielded, in order, once; it
        may run on a worker thread (hashlib releases the GIL), off the event loop."""
        self.md5.update(data)
        if self._sha256 is not None:
            self._sha256.update(data)
        for name in self._tracked:
            self._checksums[name].update(data)

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body's bytes as they arrive (framing, chunk signatures and size checked);
        ``digest`` each, then call ``finish``."""
        if self.chunked:
            async for data in self._aws_chunks():
                yield self._take(data)
        else:
            while True:
                data = await self._stream.read(READ_BLOCK)
                if not data:
                    break
                yield self._take(data)

    async def read_all(self) -> bytes:
        """A small body in memory, checked."""
        out = bytearray()
        async for data in self.chunks():
            out += data
        self.digest(bytes(out))
        self.finish()
        return bytes(out)

    async def _line(self) -> bytes:
        try:
            line = await self._stream.readline()
        except ValueError:
            raise S3Error("IncompleteBody", "A chunk header line is too long.") from None
        if len(line) > MAX_LINE:
            raise S3Error("IncompleteBody", "A chunk header line is too long.")
        return line

    async def _aws_chunks(self) -> AsyncIterator[bytes]:
        signer = self._auth.signer
        while True:
            line = await self._line()
            if not line.endswith(b"\n"):
                raise S3Error("IncompleteBody", "The request body ended inside a chunk header.")
            head, _, ext = line.strip().partition(b";")
            try:
                size = int(head, 16)
            except ValueError:
                raise S3Error("IncompleteBody", "A chunk header is malformed.") from None
            if size > MAX_CHUNK:
                raise S3Error("EntityTooLarge", "A chunk of the streaming upload is too large.")
            try:
                data = await self._stream.readexactly(size) if size else b""
            except Exception:
                raise S3Error("IncompleteBody", "The request body ended inside a chunk.") \
                    from None
            if signer is not None:
                name, _, signature = ext.decode("ascii", "replace").partition("=")
                if name.strip() != "chunk-signature":
                    raise S3Error("SignatureDoesNotMatch", "A chunk carries no signature.")
                signer.check_chunk(data, signature.strip())
            if size == 0:
                await self._trailers()
                return
            crlf = await self._stream.readexactly(2) if size else b""
            if crlf != b"\r\n":
                raise S3Error("IncompleteBody", "A chunk is not followed by CRLF.")
            yield data

    async def _trailers(self) -> None:
        canonical = b""
        signature = None
        for _ in range(MAX_TRAILERS):
            line = await self._line()
            text = line.strip()
            if not text:
                break
            name, _, value = text.decode("ascii", "replace").partition(":")
            name, value = name.strip().lower(), value.strip()
            if name == "x-amz-trailer-signature":
                signature = value
                continue
            canonical += f"{name}:{value}\n".encode()
            if name in _CHECKSUMS:
                self._declared[name] = value
        else:
            raise S3Error("IncompleteBody", "Too many trailing headers.")
        signer = self._auth.signer
        if signer is not None and self._auth.payload.endswith("-TRAILER"):
            if signature is None:
                raise S3Error("SignatureDoesNotMatch", "The trailer carries no signature.")
            signer.check_trailer(canonical, signature)

    def finish(self) -> None:
        """Check what the client declared about the body; raise ``S3Error`` on a mismatch."""
        if self.expected_size is not None and self.size != self.expected_size:
            raise S3Error("IncompleteBody", f"You did not provide the number of bytes "
                          f"specified by the Content-Length HTTP header ({self.size} of "
                          f"{self.expected_size}).")
        if self._sha256 is not None and \
                self._sha256.hexdigest() != self._auth.payload.lower():
            raise S3Error("XAmzContentSHA256Mismatch", "The provided 'x-amz-content-sha256' "
                          "header does not match what was computed.")
        md5 = self._header("content-md5")
        if md5:
            try:
                wanted = base64.b64decode(md5, validate=True)
            except (binascii.Error, ValueError):
                raise S3Error("InvalidDigest", "The Content-MD5 you specified is not valid.") \
                    from None
            if wanted != self.md5.digest():
                raise S3Error("BadDigest", "The Content-MD5 you specified did not match what "
                              "we received.")
        for name, value in self._declared.items():
            if name not in self._tracked:
                continue
            digest = self._checksums[name].digest()
            if base64.b64encode(digest).decode() != value:
                raise S3Error("BadDigest", f"The {name[len('x-amz-checksum-'):].upper()} you "
                              "specified did not match the calculated checksum.")

"""Values the core hands out: attributes, open-file handles, flusher work, errno errors."""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

__all__ = [
    "NAME_MAX",
    "RENAME_EXCHANGE",
    "RENAME_NOREPLACE",
    "ROOT_INO",
    "StreamWork",
    "WRITER_KEY",
    "Attr",
    "DeleteWork",
    "Handle",
    "MoveWork",
    "UploadWork",
    "Work",
    "check_name",
    "err",
]

ROOT_INO = 1
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
NAME_MAX = 255
WRITER_KEY = "cistern-writer"
"""Object metadata naming the cache and entry that wrote the object (``<cache id>:<ino>``):
a 412 answered by this entry's own earlier upload, whose result a power cut kept out of the
journal, is then told from another writer's object (docs/dev/cachenode.md, Power loss)."""


def err(code: int, detail: str = "") -> OSError:
    """The ``OSError`` every core method raises: the front ends turn it into its errno."""
    return OSError(code, os.strerror(code) + (f": {detail}" if detail else ""))


def check_name(name: str) -> None:
    """Refuse names no POSIX directory may hold (and that no object key could carry)."""
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise err(errno.EINVAL, repr(name))
    if len(name.encode()) > NAME_MAX:
        raise err(errno.ENAMETOOLONG, name[:40])


@dataclass(frozen=True, slots=True)
class Attr:
    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    size: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    blksize: int = 4096

    @property
    def blocks(self) -> int:
        return (self.size + 511) // 512


@dataclass(slots=True)
class Handle:
    """One open file description: what a front end keeps between open and release."""

    fh: int
    ino: int
    flags: int
    writable: bool
    fd: int
    written: int = 0


@dataclass(frozen=True, slots=True)
class UploadWork:
    ino: int
    key: str
    gen: int
    fd: int
    size: int
    metadata: dict[str, str]
    path: str
    #: Coherence: the ETag of the object this upload replaces (uploaded or fetched by this
    #: node), so the write is conditional on it; None: unconditional.
    if_match: str | None = None
    #: Coherence: the key had no owner here (no object this node knows of): create only.
    if_none_match: bool = False


@dataclass(frozen=True, slots=True)
class StreamWork:
    """A file still being written whose parts the flusher sends as they fill (core/streams.py)."""

    ino: int
    key: str
    fd: int
    metadata: dict[str, str]
    path: str
    temp_key: str | None = None
    """Streamed under a predicted final ``key`` while the file still has this temporary key
    (``flush.streamTempSuffixes``): completed only once it is renamed to ``key``."""
    #: Coherence, as for ``UploadWork``: checked at CompleteMultipartUpload.
    if_match: str | None = None
    if_none_match: bool = False


@dataclass(frozen=True, slots=True)
class MoveWork:
    ino: int
    src: str
    dst: str
    metadata: dict[str, str] | None


@dataclass(frozen=True, slots=True)
class DeleteWork:
    key: str


Work = UploadWork | MoveWork | DeleteWork

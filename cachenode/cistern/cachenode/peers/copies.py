"""Copies of other nodes' dirty files, durable before they are acknowledged.

Layout under ``<cache dir>/peers/copies/<origin node>/``: a data file ``<uuid>.data`` and a row
``<sha256(key)>.json`` naming it. A copy is received into ``<uuid>.part``; at commit its size
and MD5 are checked, the data file is fsync'd and renamed to ``.data``, then the row is written
to a temporary name, fsync'd, renamed over the key's row and the directory fsync'd — only then
does the holder answer OK. A row replaced by a newer version drops the older data file after
the new row is durable. At start, ``.part`` files and data files no row names are removed; two
rows naming one data file (a rename interrupted between its two steps) keep the newer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import time
import uuid
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from cistern.cachenode.core.datafiles import DataFiles
from cistern.cachenode.peers.index import moved_key
from cistern.cachenode.store import hash_range

__all__ = ["CopyRow", "CopyStore", "check_node_name"]

log = logging.getLogger(__name__)

_NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,252}")


def check_node_name(name: object) -> str:
    if not isinstance(name, str) or not _NODE_NAME.fullmatch(name):
        raise ValueError(f"invalid node name {name!r}")
    return name


@dataclass(frozen=True)
class CopyRow:
    origin: str
    key: str
    size: int
    mtime_ns: int
    mode: int
    etag: str | None
    """The ETag of the object at ``key`` when the origin replicated (None: no object): a
    rescue upload is conditional on it (If-Match), or create-only (If-None-Match: *)."""
    gen: int
    md5: str
    data: str
    seq: int
    received: float


class CopyStore:
    """Thread-safe. Every method that changes a copy makes the change durable first."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._rows: dict[tuple[str, str], CopyRow] = {}
        self._load()

    # ------------------------------------------------------------------ reading

    def rows(self, origin: str | None = None) -> list[CopyRow]:
        with self._lock:
            return [r for r in self._rows.values() if origin is None or r.origin == origin]

    def get(self, origin: str, key: str) -> CopyRow | None:
        with self._lock:
            return self._rows.get((origin, key))

    def find(self, key: str) -> CopyRow | None:
        """The newest copy of ``key`` from any origin."""
        with self._lock:
            found = [r for (_, k), r in self._rows.items() if k == key]
        return max(found, key=lambda r: r.seq) if found else None

    def bytes_held(self) -> int:
        with self._lock:
            return sum(r.size for r in self._rows.values())

    def data_path(self, row: CopyRow) -> Path:
        return self.root / row.origin / row.data

    # ------------------------------------------------------------------ receiving

    def begin(self, origin: str) -> tuple[Path, int]:
        """A new ``.part`` file for a copy from ``origin``: its path and an open fd."""
        directory = self.root / check_node_name(origin)
        directory.mkdir(exist_ok=True)
        path = directory / f"{uuid.uuid4().hex}.part"
        return path, os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)

    def commit(self, part: Path, fd: int, *, origin: str, key: str, size: int, mtime_ns: int,
               mode: int, etag: str | None, gen: int, md5: str) -> CopyRow:
        """Check, fsync and publish a received copy; ValueError if it is not what was sent."""
        try:
            st = os.fstat(fd)
            if st.st_size != size:
                raise ValueError(f"{key}: received {st.st_size} bytes, expected {size}")
            if _md5_of(fd, size) != md5:
                raise ValueError(f"{key}: MD5 mismatch")
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            part.unlink(missing_ok=True)
            raise
        os.close(fd)
        data = part.with_suffix(".data")
        os.rename(part, data)
        row = CopyRow(origin=origin, key=key, size=size, mtime_ns=mtime_ns, mode=mode,
                      etag=etag, gen=gen, md5=md5, data=data.name, seq=time.time_ns(),
                      received=time.time())
        with self._lock:
            old = self._rows.get((origin, key))
            if old is not None and old.gen > gen:  # an older version arriving late
                data.unlink(missing_ok=True)
                return old
            self._write_row(row)
            self._rows[(origin, key)] = row
        if old is not None and old.data != row.data:
            (self.root / origin / old.data).unlink(missing_ok=True)
        return row

    def abort(self, part: Path, fd: int) -> None:
        os.close(fd)
        part.unlink(missing_ok=True)

    # ------------------------------------------------------------------ changing

    def drop(self, origin: str, key: str, upto_gen: int | None = None) -> bool:
        """Forget a copy (uploaded, deleted); ``upto_gen``: only if not newer than that."""
        with self._lock:
            row = self._rows.get((origin, key))
            if row is None or (upto_gen is not None and row.gen > upto_gen):
                return False
            del self._rows[(origin, key)]
            self._row_path(origin, key).unlink(missing_ok=True)
        (self.root / origin / row.data).unlink(missing_ok=True)
        return True

    def rename(self, origin: str, old: str, new: str) -> int:
        """Follow a rename on the origin: one file, or every key below ``old`` when it ends
        in '/'. The new row is durable before the old one goes. Returns copies moved."""
        moved = 0
        with self._lock:
            for (o, key), row in list(self._rows.items()):
                target = moved_key(key, old, new)
                if o != origin or target is None:
                    continue
                replaced = self._rows.get((origin, target))
                moved_row = replace(row, key=target, seq=time.time_ns())
                self._write_row(moved_row)
                self._rows[(origin, target)] = moved_row
                del self._rows[(origin, key)]
                self._row_path(origin, key).unlink(missing_ok=True)
                if replaced is not None and replaced.data != row.data:
                    (self.root / origin / replaced.data).unlink(missing_ok=True)
                moved += 1
        return moved

    # ------------------------------------------------------------------ files

    def _row_path(self, origin: str, key: str) -> Path:
        return self.root / origin / (hashlib.sha256(key.encode()).hexdigest() + ".json")

    def _write_row(self, row: CopyRow) -> None:
        path = self._row_path(row.origin, row.key)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump(asdict(row), f)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)
        DataFiles.sync_dir(path.parent)

    def _load(self) -> None:
        for directory in sorted(p for p in self.root.iterdir() if p.is_dir()):
            by_data: dict[str, CopyRow] = {}
            for path in directory.glob("*.json"):
                try:
                    row = CopyRow(**json.loads(path.read_text()))
                except (OSError, ValueError, TypeError) as exc:
                    log.error("peer copies: unreadable row %s (%s): removed", path, exc)
                    path.unlink(missing_ok=True)
                    continue
                if path != self._row_path(row.origin, row.key):
                    path.unlink(missing_ok=True)
                    continue
                kept = by_data.get(row.data)
                if kept is not None:  # an interrupted rename: the newer row wins
                    loser = row if row.seq < kept.seq else kept
                    self._row_path(loser.origin, loser.key).unlink(missing_ok=True)
                    self._rows.pop((loser.origin, loser.key), None)
                    if loser is kept:
                        by_data[row.data] = row
                        self._rows[(row.origin, row.key)] = row
                    continue
                by_data[row.data] = row
                self._rows[(row.origin, row.key)] = row
            for stray in directory.iterdir():
                if stray.suffix in (".part", ".tmp") or (stray.suffix == ".data"
                                                         and stray.name not in by_data):
                    stray.unlink(missing_ok=True)
        if self._rows:
            log.info("peer copies: %d held for other nodes (%d bytes)", len(self._rows),
                     sum(r.size for r in self._rows.values()))


def _md5_of(fd: int, size: int) -> str:
    digest = hashlib.md5()
    hash_range(fd, 0, size, digest)
    return digest.hexdigest()

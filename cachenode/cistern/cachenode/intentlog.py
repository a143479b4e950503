"""The journal's intent log: new entries appended to a flat file, applied to SQLite later.

A create must be journaled before its reply (a daemon killed right after it must still find
the file), but an SQLite commit per file costs more than the rest of the create together.
So a new file's row is appended here with one ``write(2)`` and applied to SQLite in batches
(``Journal.apply_intents``); see docs/dev/cachenode.md, "The intent log".

Two files (``<journal>-intents.0`` and ``.1``), used in turn. Format: records of
``<u32 length><u32 crc32(body)><body>``, ``body = marshal((seq, row))``.
``seq`` increases by one per record and never restarts; SQLite keeps the last applied one
(``meta.intents_applied``) in the same transaction as the rows, so replaying is idempotent
and a record left behind by a truncation that never reached the disk is skipped. Reading
stops at the first torn, corrupt or out-of-sequence record: what follows it is a later
write that reached the disk before an earlier one, never something an acknowledgement
depended on (an ``fsync`` applies the log to SQLite and syncs the WAL first).

The log is written and read by the same interpreter (``marshal`` of ints, strings and
``None``, stable since Python 3.4); a clean stop leaves it empty.
"""

from __future__ import annotations

import errno
import logging
import marshal
import os
import struct
import zlib
from pathlib import Path

__all__ = ["IntentLog", "Row"]

log = logging.getLogger(__name__)

Row = tuple[int | str | None, ...]
_HEADER = struct.Struct("<II")


class IntentLog:
    """Two append-only files of ``(seq, row)`` records, used in turn.

    ``swap`` sends later appends to the other file, so the records taken for a batch can be
    applied without stopping appends and the file that held them emptied afterwards
    (``clear_previous``). Not thread-safe: the journal locks it.
    """

    def __init__(self, base: Path) -> None:
        self.paths = (Path(f"{base}.0"), Path(f"{base}.1"))
        self._fds = [os.open(p, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
                     for p in self.paths]
        self._sizes = [os.fstat(fd).st_size for fd in self._fds]
        self._active = 0

    def read(self, after: int) -> list[tuple[int, Row]]:
        """The records with ``seq > after``, in order, up to the first missing one."""
        found: dict[int, Row] = {}
        for path in self.paths:
            found.update(_read_file(path))
        records = []
        seq = after + 1
        while seq in found:
            records.append((seq, found.pop(seq)))
            seq += 1
        later = [s for s in found if s > seq]
        if later:
            log.warning("intent log %s: record %d is missing; %d later records ignored",
                        self.paths[0], seq, len(later))
        return records

    def append(self, seq: int, row: Row) -> None:
        body = marshal.dumps((seq, row))
        record = _HEADER.pack(len(body), zlib.crc32(body)) + body
        active = self._active
        written = os.write(self._fds[active], record)
        if written != len(record):  # a full disk: never leave a torn record before others
            os.ftruncate(self._fds[active], self._sizes[active])
            raise OSError(errno.ENOSPC, f"intent log {self.paths[active]}: short write")
        self._sizes[active] += written

    def swap(self) -> None:
        """Later appends go to the other file."""
        self._active ^= 1

    def clear_previous(self) -> None:
        """Empty the file appends went to before the last ``swap`` (its records are applied).
        Not synced: see the module doc."""
        previous = self._active ^ 1
        os.ftruncate(self._fds[previous], 0)
        self._sizes[previous] = 0

    def clear(self) -> None:
        """Empty both files (every record is applied)."""
        for index, fd in enumerate(self._fds):
            os.ftruncate(fd, 0)
            self._sizes[index] = 0

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)


def _read_file(path: Path) -> dict[int, Row]:
    """Every record of one file up to the first torn or corrupt one."""
    data = path.read_bytes()
    records: dict[int, Row] = {}
    offset = 0
    while offset + _HEADER.size <= len(data):
        length, crc = _HEADER.unpack_from(data, offset)
        body = data[offset + _HEADER.size:offset + _HEADER.size + length]
        if len(body) != length or zlib.crc32(body) != crc:
            log.warning("intent log %s: torn or corrupt record at byte %d ignored (and the "
                        "%d bytes after it)", path, offset, len(data) - offset)
            break
        try:
            seq, row = marshal.loads(body)
        except (ValueError, EOFError, TypeError) as exc:
            log.warning("intent log %s: unreadable record at byte %d ignored: %s", path,
                        offset, exc)
            break
        records[seq] = row
        offset += _HEADER.size + length
    return records

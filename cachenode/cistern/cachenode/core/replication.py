"""The hook through which ``fsync`` reaches other nodes (durability levels, issue 17).

The core decides *when* (the fsync path, renames, unlinks) and hands over *what* (a
``FileVersion`` with its own descriptor); an implementation outside the core (``peers/``)
decides how. The core imports nothing of it: it is injected into ``CacheCore``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

__all__ = ["FileVersion", "Level", "NoReplication", "Replication"]

Level = Literal["local", "peers", "s3"]


@dataclass(frozen=True)
class FileVersion:
    """A file as ``fsync`` made it durable locally. ``fd`` is the replication's to close."""

    key: str
    fd: int
    size: int
    mtime_ns: int
    mode: int
    etag: str | None
    """ETag of the object at ``key`` as this node knows it (None: it believes there is none)."""


class Replication(Protocol):
    def level(self, key: str) -> Level:
        """The durability level for the file at ``key``."""

    def replicate(self, version: FileVersion, if_changed: bool = False) -> None:
        """Make ``version`` durable on other nodes (closes ``version.fd``); raise ``OSError``
        when the level's policy says the fsync must fail. ``if_changed`` (at close): only if
        its size or mtime differ from what was last replicated."""

    def renamed(self, old: str, new: str) -> None:
        """A file (or a directory: both end in '/') moved; called after the core did."""

    def removed(self, key: str) -> None:
        """A file was unlinked; its copies elsewhere are no longer wanted."""


class NoReplication:
    """Durability ``local``: nothing leaves this node."""

    def level(self, key: str) -> Level:
        return "local"

    def replicate(self, version: FileVersion, if_changed: bool = False) -> None:
        raise AssertionError("level local never replicates")

    def renamed(self, old: str, new: str) -> None:
        pass

    def removed(self, key: str) -> None:
        pass

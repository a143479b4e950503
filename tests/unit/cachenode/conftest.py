"""A local-directory store that fails on request, for the flusher and store-client tests, and
the wired node of the flusher and streamer tests on it (``node``).

It is a real ``ObjectStore`` (the local-directory one) with a queue of errors per operation:
the next call of that operation raises the queued error instead of running. No client is
patched; the code under test sees exactly what a flaky store would give it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cistern.cachenode.store import LocalDirStore, ObjectInfo
from support.flushnode import Node


class FaultyStore(LocalDirStore):
    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.failures: dict[str, list[BaseException]] = defaultdict(list)
        self.calls: dict[str, int] = defaultdict(int)

    def fail(self, op: str, *errors: BaseException) -> None:
        """The next ``len(errors)`` calls of ``op`` raise these errors, in order."""
        self.failures[op].extend(errors)

    def _enter(self, op: str) -> None:
        self.calls[op] += 1
        if self.failures[op]:
            raise self.failures[op].pop(0)

    def put_file(self, key: str, fd: int, size: int, metadata: dict[str, str],
                 if_match: str | None = None, if_none_match: bool = False) -> str:
        self._enter("put_file")
        return super().put_file(key, fd, size, metadata, if_match=if_match,
                                if_none_match=if_none_match)

    def create_multipart(self, key: str, metadata: dict[str, str]) -> str:
        self._enter("create_multipart")
        return super().create_multipart(key, metadata)

    def upload_part(self, key: str, upload_id: str, number: int, fd: int, offset: int,
                    length: int) -> str:
        self._enter("upload_part")
        return super().upload_part(key, upload_id, number, fd, offset, length)

    def complete_multipart(self, key: str, upload_id: str, parts: list[tuple[int, str]],
                           if_match: str | None = None, if_none_match: bool = False) -> str:
        self._enter("complete_multipart")
        return super().complete_multipart(key, upload_id, parts, if_match=if_match,
                                          if_none_match=if_none_match)

    def abort_multipart(self, key: str, upload_id: str) -> None:
        self._enter("abort_multipart")
        super().abort_multipart(key, upload_id)

    def list_multipart(self, key: str) -> list[str]:
        self._enter("list_multipart")
        return super().list_multipart(key)

    def copy(self, src: str, dst: str, metadata: dict[str, str] | None = None) -> None:
        self._enter("copy")
        super().copy(src, dst, metadata)

    def delete(self, key: str) -> None:
        self._enter("delete")
        super().delete(key)

    def list_dir(self, prefix: str) -> tuple[list[ObjectInfo], list[str]]:
        self._enter("list_dir")
        return super().list_dir(prefix)

    def download(self, key: str, fd: int) -> ObjectInfo:
        self._enter("download")
        return super().download(key, fd)


@pytest.fixture
def faulty_store(tmp_path: Path) -> Any:
    return FaultyStore(tmp_path / "objects")


@pytest.fixture
def node(tmp_path: Path, faulty_store: Any) -> Iterator[Node]:
    """A wired core, store client and flusher (started) on ``faulty_store``."""
    n = Node(tmp_path / "cache", faulty_store)
    n.flusher.start()
    yield n
    n.close()

"""A file workload for power-cut tests that logs what it may expect to survive.

A process writes into a mounted cache: checkpoint directories (shards + ``.metadata``, each
fsync'd), overwrites with ``O_TRUNC`` (with and without fsync), changes in place,
truncations, atomic replacement (write a temp file, fsync, rename, fsync the directory),
plain renames and deletes. It logs every operation when it starts and every content a path
gets when the operation returns (``Ledger``); replayed up to an instant (a cut, taken while
node and workload are frozen), the log says which files have a durable version that nothing
has touched since, and the history of contents of every path: what a crash state is judged
against.

Contents are identified by their MD5 (random payloads never repeat); an object's ETag maps
to that MD5 both for single PUTs and for multipart uploads of ``part_size`` parts.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Ledger", "Mark", "Workload", "multipart_etag", "read_ledger"]


def multipart_etag(data: bytes, part_size: int) -> str:
    digests = [hashlib.md5(data[i:i + part_size]).digest()
               for i in range(0, len(data), part_size)]
    return f"{hashlib.md5(b''.join(digests)).hexdigest()}-{len(digests)}"


@dataclass(frozen=True)
class Mark:
    """What the workload had done at one instant (a cut)."""

    #: path -> MD5 of the version whose fsync returned before the cut, for paths that no
    #: operation touched after that fsync began.
    required: dict[str, str]
    #: path -> MD5s of every complete version the path held, oldest first.
    history: dict[str, list[str]]
    ops: int
    #: path -> files renamed onto it (begun before the mark), transitively: (source path,
    #: how many versions of the source's history were written before that rename).
    moved_in: dict[str, list[tuple[str, int]]] = field(default_factory=dict)


@dataclass
class _Path:
    current: str | None = None
    history: list[str] = field(default_factory=list)
    last_begin: int = 0
    durable: tuple[int, str] | None = None  # (begin of the durable op, md5)
    moved_in: list[tuple[str, int]] = field(default_factory=list)


class Ledger:
    """What the workload did, as a log of JSON lines the workload process appends to and
    the test replays up to any instant (a cut)."""

    def __init__(self, part_size: int, out: int | None = None) -> None:
        self.part_size = part_size
        self.etags: dict[str, str] = {}  # ETag (single or multipart) -> MD5
        self.ops = 0
        self._paths: dict[str, _Path] = {}
        self._clock = 0
        self._out = out

    def _emit(self, record: dict[str, Any]) -> None:
        if self._out is not None:
            os.write(self._out, (json.dumps(record) + "\n").encode())

    def begin(self, *paths: str) -> int:
        """An operation on ``paths`` starts; two paths are a rename (source, target)."""
        self._clock += 1
        for path in paths:
            self._paths.setdefault(path, _Path()).last_begin = self._clock
        if len(paths) == 2:
            # Recorded at the start: a rename in flight at a cut may be in the crash state.
            src, dst = (self._paths[p] for p in paths)
            self._paths[paths[1]].moved_in = [*dst.moved_in, (paths[0], len(src.history)),
                                              *src.moved_in]
        self._emit({"begin": list(paths)})
        return self._clock

    def assign(self, path: str, data: bytes | None, *, durable_from: int | None = None) -> None:
        """``path`` now holds ``data`` (None: removed); durable if ``durable_from`` is the
        begin of the operation that made it so."""
        md5 = None if data is None else hashlib.md5(data).hexdigest()
        etags = [] if data is None else [md5, multipart_etag(data, self.part_size)]
        self._assigned(path, md5, etags, durable_from)
        self._emit({"assign": path, "md5": md5, "etags": etags, "durable": durable_from})

    def _assigned(self, path: str, md5: str | None, etags: list[str],
                  durable_from: int | None) -> None:
        self._clock += 1
        state = self._paths.setdefault(path, _Path())
        state.current = md5
        if md5 is not None:
            state.history.append(md5)
            for etag in etags:
                self.etags[etag] = md5
            if durable_from is not None:
                state.durable = (durable_from, md5)

    def done(self) -> None:
        self.ops += 1
        self._emit({"done": 1})

    def replay(self, lines: list[str]) -> None:
        for line in lines:
            record = json.loads(line)
            if "begin" in record:
                self.begin(*record["begin"])
            elif "assign" in record:
                self._assigned(record["assign"], record["md5"], record["etags"],
                               record["durable"])
            else:
                self.done()

    def live(self, paths: list[str]) -> list[str]:
        return [p for p in paths if self._paths.get(p, _Path()).current is not None]

    def mark(self) -> Mark:
        required = {path: state.durable[1] for path, state in self._paths.items()
                    if state.durable is not None and state.current is not None
                    and state.last_begin == state.durable[0]}
        history = {path: list(state.history) for path, state in self._paths.items()}
        moved_in = {path: list(state.moved_in) for path, state in self._paths.items()
                    if state.moved_in}
        return Mark(required=required, history=history, ops=self.ops, moved_in=moved_in)


def read_ledger(log: Path, part_size: int) -> Ledger:
    """The ledger as the log holds it now (a line being written is left out)."""
    text = log.read_text() if log.exists() else ""
    lines = text.split("\n")[:-1]
    ledger = Ledger(part_size)
    ledger.replay(lines)
    return ledger


class Workload:
    """The writing side; runs in its own process (see ``main``) so that a frozen node never
    blocks the test process (a fork there would flush the workload's open FUSE files)."""

    def __init__(self, root: Path, ledger: Ledger, *, seed: int, big_size: int,
                 files: int = 8) -> None:
        self.root = root
        self.ledger = ledger
        self.rng = random.Random(seed)
        self.big_size = big_size
        self.files = [f"w/f{i}" for i in range(files)]
        self._current: dict[str, bytes] = {}
        self._step = 0
        self._ckpts: list[str] = []
        self._versions = 0

    def run(self) -> None:
        (self.root / "w").mkdir(exist_ok=True)
        (self.root / "ckpt").mkdir(exist_ok=True)
        ops = [(self._checkpoint, 3), (self._rewrite, 4), (self._modify_in_place, 2),
               (self._truncate, 1), (self._replace, 2), (self._rename, 1), (self._delete, 1),
               (self._create, 2)]
        choices = [op for op, weight in ops for _ in range(weight)]
        while True:
            self.rng.choice(choices)()
            self.ledger.done()

    def _begin(self, *paths: str) -> int:
        return self.ledger.begin(*paths)

    def _assign(self, path: str, data: bytes | None, *, durable_from: int | None = None) -> None:
        if data is None:
            self._current.pop(path, None)
        else:
            self._current[path] = data
        self.ledger.assign(path, data, durable_from=durable_from)

    # ------------------------------------------------------------------ operations

    def _payload(self, path: str, size: int | None = None) -> bytes:
        self._versions += 1
        if size is None:
            size = self.rng.choice((0, 1000, 64 << 10, 700 << 10, 2 << 20))
        header = f"{path}|v{self._versions}|".encode()
        return header + self.rng.randbytes(max(0, size - len(header)))

    def _existing(self) -> str | None:
        live = [p for p in self.files if p in self._current]
        return self.rng.choice(live) if live else None

    def _write(self, path: str, data: bytes, *, trunc: bool, sync: bool) -> None:
        begin = self._begin(path)
        flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if trunc else 0)
        fd = os.open(self.root / path, flags, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
        self._assign(path, data, durable_from=begin if sync else None)

    def _checkpoint(self) -> None:
        """A checkpoint: shards (one sometimes large enough for multipart), then a commit
        marker, each fsync'd; older checkpoints beyond three are deleted."""
        self._step += 1
        directory = f"ckpt/step-{self._step}"
        os.mkdir(self.root / directory)
        for rank in range(self.rng.randint(1, 3)):
            size = self.big_size if self.rng.random() < 0.15 else None
            path = f"{directory}/rank{rank}.distcp"
            self._write(path, self._payload(path, size), trunc=True, sync=True)
        marker = f"{directory}/.metadata"
        self._write(marker, self._payload(marker, 300), trunc=True, sync=True)
        self._ckpts.append(directory)
        while len(self._ckpts) > 3:
            old = self._ckpts.pop(0)
            for name in sorted(os.listdir(self.root / old)):
                path = f"{old}/{name}"
                self._begin(path)
                os.unlink(self.root / path)
                self._assign(path, None)
            os.rmdir(self.root / old)

    def _rewrite(self) -> None:
        """Overwrite an existing file with O_TRUNC, with or without fsync."""
        path = self._existing() or self.rng.choice(self.files)
        self._write(path, self._payload(path), trunc=True, sync=self.rng.random() < 0.4)

    def _create(self) -> None:
        path = self.rng.choice(self.files)
        self._write(path, self._payload(path), trunc=True, sync=True)

    def _modify_in_place(self) -> None:
        """Change some bytes of an existing file without truncating it, no fsync."""
        path = self._existing()
        if path is None:
            return
        old = self._current[path]
        if not old:
            return
        self._begin(path)
        offset = self.rng.randrange(len(old))
        patch = self.rng.randbytes(min(4096, len(old) - offset))
        fd = os.open(self.root / path, os.O_WRONLY)
        try:
            os.pwrite(fd, patch, offset)
        finally:
            os.close(fd)
        self._assign(path, old[:offset] + patch + old[offset + len(patch):])

    def _truncate(self) -> None:
        path = self._existing()
        if path is None:
            return
        old = self._current[path]
        size = self.rng.randrange(len(old) + 1)
        self._begin(path)
        os.truncate(self.root / path, size)
        self._assign(path, old[:size])

    def _replace(self) -> None:
        """Atomic replacement: temp file, fsync, rename over the target, fsync the dir."""
        path = self.rng.choice(self.files)
        tmp = f"w/.tmp-{self.rng.randrange(1 << 30)}"
        data = self._payload(path)
        self._write(tmp, data, trunc=True, sync=True)
        begin = self._begin(tmp, path)
        os.rename(self.root / tmp, self.root / path)
        self._assign(tmp, None)
        fd = os.open(self.root / "w", os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        self._assign(path, data, durable_from=begin)

    def _rename(self) -> None:
        """Plain rename of one file onto another name (maybe replacing it), no sync."""
        src = self._existing()
        if src is None:
            return
        dst = self.rng.choice([p for p in self.files if p != src])
        data = self._current[src]
        self._begin(src, dst)
        os.rename(self.root / src, self.root / dst)
        self._assign(src, None)
        self._assign(dst, data)

    def _delete(self) -> None:
        path = self._existing()
        if path is None:
            return
        self._begin(path)
        os.unlink(self.root / path)
        self._assign(path, None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--log", type=Path, required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--part-size", type=int, required=True)
    parser.add_argument("--big-size", type=int, required=True)
    args = parser.parse_args()
    out = os.open(args.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    Workload(args.root, Ledger(args.part_size, out), seed=args.seed,
             big_size=args.big_size).run()


if __name__ == "__main__":
    main()

"""Model-based tests of the cache core: random sequences of file operations, uploads that
succeed or fail, and daemon crashes with restarts, against a plain in-memory model.

In every reachable state: each file reads back what the model says; a file fsync'd and not
touched since still reads back its fsync'd content after a crash; a CLEAN file's object in
the store equals its local content; and once the flusher has run everything, the store holds
exactly the model's files and the cache is idle.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from cistern.cachenode.core import ROOT_INO, CacheCore, MoveWork, UploadWork, Work
from cistern.cachenode.store import LocalDirStore
from cistern.config import CacheConfig, FlushPolicy

NAMES = st.sampled_from(["a", "b", "c", "d"])
DATA = st.binary(min_size=0, max_size=64)


class CoreModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.root = Path(tempfile.mkdtemp(prefix="core-model-"))
        self.objects = self.root / "objects"
        self.core = self._open()
        self.files: dict[str, bytes] = {}
        self.durable: dict[str, bytes] = {}  # fsync'd and untouched since
        self.held: list[Work] = []  # handed out by the core, not reported yet
        self.abandoned: list[CacheCore] = []

    def _open(self) -> CacheCore:
        # revalidateAfter ~0: every look at the directory lists the store again and merges it
        # (readthrough._merge), so every step checks that a listing never drops or changes a
        # file whose object this node itself is changing (no other writer here).
        return CacheCore(self.root / "cache", LocalDirStore(self.objects),
                         flush=FlushPolicy(upload_delay=0.0),
                         cache=CacheConfig(revalidate_after=1e-9))

    def teardown(self) -> None:
        for work in self.held:
            if isinstance(work, UploadWork):
                os.close(work.fd)
        self.core.close()
        for old in self.abandoned:
            old.journal.close()
        shutil.rmtree(self.root, ignore_errors=True)

    # ------------------------------------------------------------------ helpers

    def _ino(self, name: str) -> int:
        return self.core.lookup(ROOT_INO, name).ino

    def _touch(self, name: str) -> None:
        self.durable.pop(name, None)

    def _read(self, name: str) -> bytes:
        handle = self.core.open(self._ino(name), os.O_RDONLY)
        try:
            return self.core.read(handle, 0, 1 << 20)
        finally:
            self.core.release(handle)

    def _execute(self, work: Work, ok: bool) -> None:
        store = self.core.store
        if isinstance(work, UploadWork):
            try:
                if ok and self.core.prepare_upload(work) \
                        and self.core.upload_source_current(work):
                    etag = store.put_file(work.key, work.fd, work.size, work.metadata)
                    self.core.finish_upload(work, etag, None)
                else:
                    self.core.finish_upload(work, None, OSError("injected failure"))
            finally:
                os.close(work.fd)
        elif isinstance(work, MoveWork):
            if ok:
                store.copy(work.src, work.dst, work.metadata)
            self.core.finish_move(work, None if ok else OSError("injected failure"))
        else:
            if ok:
                store.delete(work.key)
            self.core.finish_delete(work, None if ok else OSError("injected failure"))

    # ------------------------------------------------------------------ file operations

    @rule(name=NAMES, data=DATA, sync=st.booleans())
    def write_file(self, name: str, data: bytes, sync: bool) -> None:
        """Create or rewrite with O_TRUNC, optionally fsync."""
        if name in self.files:
            handle = self.core.open(self._ino(name), os.O_WRONLY | os.O_TRUNC)
        else:
            handle, _ = self.core.create(ROOT_INO, name, 0o644, os.O_WRONLY, 0, 0)
        self.core.write(handle, 0, data)
        if sync:
            self.core.fsync(handle)
        self.core.release(handle)
        self.files[name] = data
        if sync:
            self.durable[name] = data
        else:
            self._touch(name)

    @precondition(lambda self: self.files)
    @rule(data=st.data(), patch=st.binary(min_size=1, max_size=8))
    def change_in_place(self, data: st.DataObject, patch: bytes) -> None:
        name = data.draw(st.sampled_from(sorted(self.files)))
        old = self.files[name]
        offset = data.draw(st.integers(0, len(old)))
        handle = self.core.open(self._ino(name), os.O_RDWR)
        self.core.write(handle, offset, patch)
        self.core.release(handle)
        new = old[:offset] + patch + old[offset + len(patch):]
        self.files[name] = new
        self._touch(name)

    @precondition(lambda self: self.files)
    @rule(data=st.data())
    def truncate(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(self.files)))
        size = data.draw(st.integers(0, len(self.files[name]) + 4))
        self.core.setattr(self._ino(name), size=size)
        old = self.files[name]
        self.files[name] = old[:size] + b"\0" * (size - len(old))
        self._touch(name)

    @precondition(lambda self: self.files)
    @rule(data=st.data(), new=NAMES)
    def rename(self, data: st.DataObject, new: str) -> None:
        old = data.draw(st.sampled_from(sorted(self.files)))
        self.core.rename(ROOT_INO, old, ROOT_INO, new)
        if old != new:
            self.files[new] = self.files.pop(old)
            self._touch(old)
            self._touch(new)

    @precondition(lambda self: self.files)
    @rule(data=st.data())
    def unlink(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(self.files)))
        self.core.unlink(ROOT_INO, name)
        del self.files[name]
        self._touch(name)

    # ------------------------------------------------------------------ the flusher

    @rule(limit=st.integers(1, 4))
    def take_work(self, limit: int) -> None:
        """The flusher takes work; it runs later (so files change while it is in flight)."""
        self.held.extend(self.core.collect_work(limit, force=True))

    @precondition(lambda self: self.held)
    @rule(ok=st.booleans())
    def report_work(self, ok: bool) -> None:
        self._execute(self.held.pop(0), ok)

    # ------------------------------------------------------------------ crashes

    @rule()
    def crash_and_restart(self) -> None:
        """kill -9: nothing reported, nothing closed; a new core on the same directory."""
        for work in self.held:
            if isinstance(work, UploadWork):
                os.close(work.fd)
        self.held.clear()
        self.abandoned.append(self.core)
        self.core = self._open()

    # ------------------------------------------------------------------ invariants

    @invariant()
    def files_read_back(self) -> None:
        listed = {name for name, _ in self.core.readdir(ROOT_INO)}
        assert listed == set(self.files)
        for name, data in self.files.items():
            assert self._read(name) == data, name

    @invariant()
    def fsynced_files_are_what_was_fsynced(self) -> None:
        for name, data in self.durable.items():
            assert self.files.get(name) == data

    @invariant()
    def clean_files_match_their_objects(self) -> None:
        for name, data in self.files.items():
            info = self.core.debug_entry(name)
            assert info is not None
            if info["state"] == "clean" and not info["in_flight"]:
                # (after a rename the object is still at its old key until the move runs)
                assert (self.objects / info["remote_key"]).read_bytes() == data, name

    @invariant()
    def byte_counts_add_up(self) -> None:
        dirty = clean = 0
        for name, data in self.files.items():
            info = self.core.debug_entry(name)
            assert info is not None
            if info["state"] == "dirty":
                dirty += len(data)
            elif info["state"] == "clean":
                clean += len(data)
        assert self.core.dirty_bytes == dirty
        assert self.core.clean_bytes == clean

    def check_flushed(self) -> None:
        """Report what is held, then run the flusher to the end: the store is the model."""
        while self.held:
            self._execute(self.held.pop(0), True)
        self.core.finish_stale_uploads()  # the flusher aborts interrupted multipart uploads
        for _ in range(50):
            work = self.core.collect_work(100, force=True)
            if not work:
                break
            for item in work:
                self._execute(item, True)
        assert self.core.idle()
        stored = {p.name: p.read_bytes() for p in self.objects.glob("*")
                  if p.is_file() and not p.name.startswith(".")}
        assert stored == self.files


class FlushedAtTheEnd(CoreModel):
    def teardown(self) -> None:
        try:
            self.check_flushed()
        finally:
            super().teardown()


FlushedAtTheEnd.TestCase.settings = settings(
    max_examples=int(os.environ.get("CISTERN_MODEL_EXAMPLES", "100")), stateful_step_count=25,
    deadline=None, suppress_health_check=[HealthCheck.too_slow])
test_core_against_model = FlushedAtTheEnd.TestCase

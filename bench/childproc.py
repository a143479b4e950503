"""A bench workload child process that speaks JSON lines: ``python -m bench.<module>`` run from
the repository root, one JSON event a line on its stdout, commands on its stdin, its stderr
kept in a temporary file for the error message.

Used as a context manager: leaving the block kills a child that is still running, and raises
``RuntimeError`` (with the tail of its stderr) when the block failed on the child's account
(no further event, an unexpected event, a timeout, a broken pipe) or the child exited
non-zero."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = ["REPO_ROOT", "EventChild", "child_env"]

REPO_ROOT = Path(__file__).resolve().parent.parent

_CHILD_FAILURES = (StopIteration, RuntimeError, subprocess.TimeoutExpired, OSError)


def child_env() -> dict[str, str]:
    """This environment with the repository root first on ``PYTHONPATH`` (``bench`` and
    ``tests.support`` importable)."""
    path = os.environ.get("PYTHONPATH", "")
    return dict(os.environ, PYTHONPATH=f"{REPO_ROOT}{os.pathsep}{path}" if path
                else str(REPO_ROOT))


class EventChild:
    """One child process; ``what`` names it in error messages ("checkpoint save")."""

    def __init__(self, cmd: list[str], what: str) -> None:
        self.what = what
        self._stderr = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - closed in stop
        self._stderr_text: str | None = None
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._stderr, text=True, env=child_env(),
                                     cwd=REPO_ROOT)
        self._events = self._read_events()

    def _read_events(self) -> Iterator[dict[str, Any]]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.strip()
            if line.startswith("{"):
                yield json.loads(line)

    def events(self) -> Iterator[dict[str, Any]]:
        """The child's events in order (one iterator for the whole run)."""
        return self._events

    def send(self, line: str) -> None:
        """Write one command line to the child's stdin."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def finish(self, timeout: float) -> None:
        """Close the child's stdin (no more commands) and wait for it to exit."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        """Kill the child if it still runs, reap it and keep its stderr (idempotent)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        if self._stderr_text is None:
            self._stderr.seek(0)
            self._stderr_text = str(self._stderr.read())
            self._stderr.close()

    def failure(self, reason: object) -> RuntimeError:
        """The error to raise for this child, with the tail of its stderr."""
        if self._stderr_text is None:
            self._stderr.seek(0)
            tail = str(self._stderr.read())
        else:
            tail = self._stderr_text
        return RuntimeError(f"{self.what} failed ({reason}): {tail[-800:]}")

    def __enter__(self) -> EventChild:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
        if isinstance(exc, _CHILD_FAILURES):
            raise self.failure(f"{self.proc.returncode}, {exc!r}") from None
        if exc is None and self.proc.returncode != 0:
            raise self.failure(self.proc.returncode)

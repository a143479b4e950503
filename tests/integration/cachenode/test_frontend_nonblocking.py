"""A writer held by backpressure must not freeze the mount for everyone else."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

import pytest

from support.wait import wait_until

MiB = 2**20


@pytest.fixture
def frontend() -> str:
    """pyfuse3 only: with kernel passthrough the writes never reach the daemon (the kernel
    writes the backing file), so there is no write for admission to hold."""
    return "pyfuse3"


def _answers(fn: Callable[[], object], timeout: float = 10.0) -> bool:
    """Run ``fn`` (a syscall on the mount) in a thread; True if it returned in time.

    A frozen FUSE daemon leaves the caller stuck in the kernel, so the call runs in a daemon
    thread the test can abandon.
    """
    finished = threading.Event()

    def run() -> None:
        fn()
        finished.set()

    threading.Thread(target=run, daemon=True).start()
    return finished.wait(timeout)


def test_a_writer_held_in_admission_does_not_freeze_the_mount(make_node: Any,
                                                               bucket: str) -> None:
    # The writer's own 16 MiB cannot be uploaded while it is open, so it is held at capacity
    # for the whole admission timeout (then let through: a write to an existing file is never
    # failed). During that time every other request must still be answered; the probes take
    # milliseconds, and the test checks that the hold outlasted them.
    node = make_node(bucket, upload_delay=0.0,
                     config={"cache": {"capacityBytes": "4Mi", "admissionTimeout": "12s",
                                       "highWatermark": 0.5, "lowWatermark": 0.25}})
    (node.mount / "existing").write_bytes(b"readable")
    done = threading.Event()

    def writer() -> None:
        block = os.urandom(MiB)
        with open(node.mount / "big", "wb", buffering=0) as f:
            for _ in range(17):
                f.write(block)
        done.set()

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    wait_until(lambda: "holding a writer" in node.log_path.read_text(errors="replace"),
               timeout=60, what="the writer to reach the capacity hold")
    assert _answers(lambda: os.mkdir(node.mount / "d")), "mkdir hung behind the held writer"
    assert _answers(lambda: os.listdir(node.mount)), "readdir hung behind the held writer"
    assert _answers(lambda: (node.mount / "existing").read_bytes()), "a read hung"
    assert _answers(lambda: os.stat(node.mount / "big")), "getattr hung"
    assert not done.is_set(), "the writer was let through before the mount was probed"
    thread.join(120)
    assert done.is_set()
    assert os.stat(node.mount / "big").st_size == 17 * MiB

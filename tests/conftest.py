"""Shared fixtures: a real moto S3 server, the fault proxy, and real cistern-node processes."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from support.faultproxy import FaultProxyProcess
from support.node import NodeProcess
from support.s3server import MotoServer

#: Every cache-node test runs on these; the data-path and durability suites also on the splice
#: front end (``support.frontends.ALL_FRONTENDS``), to keep CI time in bounds.
FRONTENDS = ("pyfuse3", "passthrough")


def _passthrough_reason() -> str | None:
    try:
        from cistern.cachenode.fuse_passthrough import probe_passthrough
    except ImportError as exc:
        return f"passthrough front end not importable: {exc}"
    ok, reason = probe_passthrough()
    return None if ok else reason


@pytest.fixture(scope="session")
def moto() -> Iterator[MotoServer]:
    with MotoServer() as server:
        yield server


@pytest.fixture
def s3(moto: MotoServer) -> Any:
    return moto.client()


@pytest.fixture
def bucket(s3: Any) -> str:
    name = f"b-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    return name


class _ProxyHandle:
    """The fault proxy as a separate process, with the in-process proxy's methods.

    A separate process matters: a client in the test process that holds the GIL during a
    FUSE syscall (torch's C++ file writer does) would otherwise starve an in-process proxy
    that the daemon needs to answer that very syscall.
    """

    def __init__(self, process: FaultProxyProcess) -> None:
        self.endpoint = process.endpoint
        self._control = process.control

    def counts(self) -> dict[str, int]:
        return self._control.counts()

    def log(self) -> list[Any]:
        return self._control.log()

    def set(self, **changes: Any) -> Any:
        return self._control.set(**changes)


@pytest.fixture(scope="session")
def _proxy_process(moto: MotoServer) -> Iterator[FaultProxyProcess]:
    with FaultProxyProcess(moto.endpoint) as process:
        yield process


@pytest.fixture
def proxy(_proxy_process: FaultProxyProcess) -> _ProxyHandle:
    """The fault proxy in front of ``moto``, as a fresh one: defaults, no counts (one process
    for the session; a test's nodes are stopped before the next test restores it)."""
    _proxy_process.control.restore()
    return _ProxyHandle(_proxy_process)


@pytest.fixture(params=FRONTENDS)
def frontend(request: pytest.FixtureRequest) -> str:
    name = str(request.param)
    if name == "passthrough" and not os.environ.get("CISTERN_SKIP_PROBE"):
        reason = _passthrough_reason()
        if reason is not None:
            pytest.skip(f"kernel FUSE passthrough unavailable on this machine: {reason}")
    return name


@pytest.fixture
def make_node(tmp_path: Path, moto: MotoServer, frontend: str
              ) -> Iterator[Callable[..., NodeProcess]]:
    """Factory for cistern-node processes over the test S3 server (stopped at teardown)."""
    nodes: list[NodeProcess] = []

    def make(bucket: str, *, endpoint: str | None = None, start: bool = True,
             name: str = "n", **kwargs: Any) -> NodeProcess:
        workdir = tmp_path / f"{name}{len(nodes)}"
        workdir.mkdir()
        kwargs.setdefault("frontend", frontend)
        node = NodeProcess(workdir, f"s3://{bucket}", endpoint_url=endpoint or moto.endpoint,
                           **kwargs)
        nodes.append(node)
        return node.start() if start else node

    yield make
    for node in nodes:
        node.stop()

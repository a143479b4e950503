"""Mounts survive the daemon: a holder keeps /dev/fuse, each new daemon takes it over.

Real ``cistern-node holder`` and ``cistern-node run`` processes, a real passthrough mount, the
moto S3 server. The daemon is killed with SIGKILL while applications use the mount; they must
see a pause, never an error, and every fsync'd byte must reach S3.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.error
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cistern.cachenode.fuse_passthrough import probe_passthrough
from support.node import NodeProcess
from support.s3server import TEST_CREDENTIALS, MotoServer, read_object
from support.wait import wait_until

KILLS = 20
pytestmark = pytest.mark.timeout(150)


def is_mounted(path: Path) -> bool:
    """From the mount table alone: resolving the path would stat the mount itself, and that
    waits while no daemon serves it."""
    target = os.path.abspath(path)
    with open("/proc/self/mountinfo") as table:
        return any(line.split()[4] == target for line in table)


def _unmount(mount: Path) -> None:
    while is_mounted(mount):
        if subprocess.run(["umount", "-l", str(mount)], capture_output=True).returncode:
            break


class HeldNode(NodeProcess):
    """A ``cistern-node run`` that hands its mount to a holder, restartable after kill -9.

    ``start`` never touches the mount point: while the holder keeps a connection that no
    daemon serves, any access to it waits for the next daemon.
    """

    def __init__(self, workdir: Path, store: str, *, holder: Path, frontend: str = "passthrough",
                 **kwargs: Any) -> None:
        super().__init__(workdir, store, frontend=frontend,
                         extra_args=["--fuse-holder", str(holder)], **kwargs)
        self.mount.mkdir(parents=True, exist_ok=True)

    def start(self, timeout: float = 30.0) -> HeldNode:
        env = dict(os.environ, **TEST_CREDENTIALS)
        self._close_log()
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed by the base class
        self.proc = subprocess.Popen(self.command(), env=env, stdout=self._log_file,
                                     stderr=subprocess.STDOUT, start_new_session=True)

        def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"cistern-node exited with {self.proc.returncode}:\n"
                                   f"{self.log()}")
            with contextlib.suppress(OSError, urllib.error.URLError, ValueError):
                return is_mounted(self.mount) and self.status().state == "running"
            return False

        wait_until(up, timeout, "cistern-node to serve")
        return self

    def kill_only(self) -> None:
        """kill -9, leaving the mount to the holder."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)


class HolderProcess:
    """``cistern-node holder`` as a child process."""

    def __init__(self, workdir: Path) -> None:
        self.socket = workdir / "holder.sock"
        self.log_path = workdir / "holder.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> HolderProcess:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "cistern.cachenode.cli", "holder", "--socket",
                 str(self.socket), "--log-level", "debug"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_until(self.socket.exists, 10, "the holder socket")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(10)
        wait_until(lambda: not self.socket.exists(), 10, "the holder socket to go")


@pytest.fixture
def holder_process(tmp_path: Path) -> Iterator[HolderProcess]:
    """Stopping the holder ends every connection no daemon serves, which also wakes
    anything a failed test left waiting on the mount."""
    holder = HolderProcess(tmp_path).start()
    yield holder
    holder.stop()
    _unmount(tmp_path / "node" / "mnt")


@pytest.fixture
def holder(holder_process: HolderProcess) -> Path:
    return holder_process.socket


@pytest.fixture(params=["passthrough"])
def held_frontend(request: pytest.FixtureRequest) -> str:
    """The /dev/fuse front end of the held daemons (``ALSO_SPLICE`` adds the splice one)."""
    name = str(request.param)
    if name == "passthrough":
        ok, reason = probe_passthrough()
        if not ok:
            pytest.skip(f"kernel FUSE passthrough unavailable on this machine: {reason}")
    return name


#: Tests that also run with the splice front end taking the connection over.
ALSO_SPLICE = pytest.mark.parametrize("held_frontend", ["passthrough", "splice"], indirect=True)


@pytest.fixture
def held_node(tmp_path: Path, moto: MotoServer, holder: Path, held_frontend: str
              ) -> Iterator[Callable[..., HeldNode]]:
    """Daemons with a /dev/fuse front end (only those can take a connection over;
    ``test_pyfuse3_refuses_a_held_connection`` shows why)."""
    nodes: list[HeldNode] = []

    def make(bucket: str, **kwargs: Any) -> HeldNode:
        node = HeldNode(tmp_path / "node", f"s3://{bucket}", holder=holder,
                        frontend=held_frontend,
                        endpoint_url=kwargs.pop("endpoint", moto.endpoint), **kwargs)
        nodes.append(node)
        return node.start()

    yield make
    for node in nodes:  # the holder fixture then ends the connection
        if node.proc is not None and node.proc.poll() is None:
            node.kill_only()
        node._close_log()


def test_open_files_work_while_no_daemon_runs(held_node: Any, bucket: str, s3: Any) -> None:
    node = held_node(bucket)
    head, tail = os.urandom(300_000), os.urandom(200_000)
    fd = os.open(node.mount / "open.bin", os.O_RDWR | os.O_CREAT, 0o644)
    os.write(fd, head)
    node.kill_only()
    # No daemon at all: passthrough reads and writes are done by the kernel.
    assert os.pwrite(fd, tail, len(head)) == len(tail)
    assert os.pread(fd, len(head) + len(tail), 0) == head + tail
    node.start()
    os.fsync(fd)  # FSYNC on a handle the previous daemon opened
    # A second open of the inode while the first is open: the kernel refuses a passthrough
    # open with another backing file, so this works only if the old backing id is reused.
    assert (node.mount / "open.bin").read_bytes() == head + tail
    os.close(fd)
    node.flush()
    assert read_object(s3, bucket, "open.bin") == head + tail
    fuse = node.status().fuse
    assert fuse.takeovers == 1 and fuse.held is True
    assert (fuse.last_takeover_pause_seconds or 0) > 0
    assert node.metric("cistern_fuse_takeovers_total") == 1


@ALSO_SPLICE
def test_a_writer_kept_open_across_a_restart_is_uploaded_after_its_close(
        held_node: Any, bucket: str, s3: Any) -> None:
    """The new daemon must know the file still has a writer: it may not upload the file and
    call it clean while the kernel keeps writing to it."""
    node = held_node(bucket, upload_delay=0.0)
    with open(node.mount / "long.bin", "wb") as f:
        f.write(b"a" * 1000)
        f.flush()
        os.fsync(f.fileno())
        node.kill_only()
        node.start()
        assert node.status().open_writers == 1
        f.write(b"b" * 1000)
    node.flush()
    assert read_object(s3, bucket, "long.bin") == b"a" * 1000 + b"b" * 1000


@ALSO_SPLICE
def test_sigterm_hands_the_mount_to_the_next_daemon(held_node: Any, bucket: str,
                                                    s3: Any) -> None:
    node = held_node(bucket)
    with open(node.mount / "kept.txt", "w") as f:
        f.write("before")
        f.flush()
        node.proc.send_signal(signal.SIGTERM)  # an upgrade: no drain, no unmount
        assert node.proc.wait(30) == 0
        assert is_mounted(node.mount)
        f.write(" after")
        node.start()
    assert (node.mount / "kept.txt").read_text() == "before after"
    node.flush()
    assert read_object(s3, bucket, "kept.txt") == b"before after"


@ALSO_SPLICE
def test_a_request_the_dead_daemon_was_answering_is_resent(
        held_node: Any, bucket: str, s3: Any, proxy: Any) -> None:
    data = os.urandom(1 << 20)
    s3.put_object(Bucket=bucket, Key="remote.bin", Body=data)
    node = held_node(bucket, endpoint=proxy.endpoint)
    assert "remote.bin" in os.listdir(node.mount)
    proxy.set(latency=3.0)  # the OPEN fetches from S3: slowly
    result: dict[str, Any] = {}

    def read() -> None:
        try:
            result["data"] = (node.mount / "remote.bin").read_bytes()
        except OSError as exc:
            result["error"] = exc

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    wait_until(lambda: proxy.counts().get("GET", 0) >= 1, 15, "the fetch to start")
    node.kill_only()  # the OPEN was read by this daemon and is not answered
    proxy.set(latency=0.0)
    node.start()
    reader.join(30)
    assert not reader.is_alive()
    assert result.get("data") == data, result.get("error")
    assert (node.status().fuse.resent_requests or 0) >= 1


def _writer(directory: Path, lister: Path, stop: threading.Event, ops: list[Any],
            files: dict[str, str], errors: list[BaseException]) -> None:
    """Checkpoint-like files: write a temp file, fsync, rename into place; list now and then.

    ``ops`` gets (start, end) of every system call, ``files`` name -> sha256 of every file
    whose fsync and rename returned.
    """
    rng = random.Random(14)
    clock = time.monotonic
    index = 0
    try:
        while not stop.is_set():
            index += 1
            name = f"ckpt-{index:05d}.pt"
            data = rng.randbytes(rng.choice((4096, 65536, 1 << 20)))
            tmp = directory / f".{name}.tmp"
            start = clock()
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            ops.append((start, clock()))
            for offset in range(0, len(data), 256 << 10):
                start = clock()
                os.write(fd, data[offset:offset + (256 << 10)])
                ops.append((start, clock()))
            start = clock()
            os.fsync(fd)
            ops.append((start, clock()))
            start = clock()
            os.close(fd)
            ops.append((start, clock()))
            start = clock()
            os.rename(tmp, directory / name)
            ops.append((start, clock()))
            files[name] = hashlib.sha256(data).hexdigest()
            if index % 5 == 0:
                start = clock()
                listed = set(os.listdir(lister))
                ops.append((start, clock()))
                if name not in listed:
                    raise AssertionError(f"{name} missing from the listing of {lister}")
    except BaseException as exc:  # reported by the test
        errors.append(exc)


@ALSO_SPLICE
def test_writer_through_a_bind_mount_sees_no_error_across_20_kill_9(
        held_node: Any, holder_process: HolderProcess, bucket: str, s3: Any,
        tmp_path: Path) -> None:
    node = held_node(bucket, upload_delay=0.2)
    volume = node.mount / "volumes" / "pvc-1"
    volume.mkdir(parents=True)
    target = tmp_path / "pod" / "volume"  # what NodePublishVolume bind-mounts for a pod
    target.mkdir(parents=True)
    subprocess.run(["mount", "--bind", str(volume), str(target)], check=True)
    stop = threading.Event()
    ops: list[tuple[float, float]] = []
    files: dict[str, str] = {}
    errors: list[BaseException] = []
    writer = threading.Thread(target=_writer, args=(target, volume, stop, ops, files, errors),
                              daemon=True)
    rng = random.Random(1414)
    kills: list[float] = []
    try:
        writer.start()
        for _ in range(KILLS):
            done = len(files)

            def progressed(done: int = done) -> bool:
                return len(files) > done or bool(errors)

            wait_until(progressed, 30, "the writer to finish a file")
            assert not errors, errors
            time.sleep(rng.uniform(0.0, 0.3))  # a random moment of the writer's loop
            kills.append(time.monotonic())
            node.kill_only()
            node.start()
        done = len(files)
        wait_until(lambda: len(files) > done or bool(errors), 30,
                   "the writer to finish a file")
    finally:
        stop.set()
        if node.proc is None or node.proc.poll() is not None:
            # A daemon that failed to start (its error is in the exception above) leaves the
            # held mount without one: the writer, and umount's statfs, would wait for it until
            # the test timed out and hid that error. Ending the connection wakes them.
            holder_process.stop()
        writer.join(60)
        subprocess.run(["umount", str(target)], check=False)
    assert not writer.is_alive()
    assert not errors, errors
    assert node.status().fuse.takeovers == KILLS

    # The pause per restart: the longest system call that ended between this kill and the
    # next one (calls blocked by the restart end right after it).
    ends = [*kills[1:], float("inf")]
    pauses = [max((end - start for start, end in ops if kill <= end < until), default=0.0)
              for kill, until in zip(kills, ends, strict=True)]
    report = {"restarts": KILLS, "files": len(files), "pauses": [round(p, 3) for p in pauses],
              "max": round(max(pauses), 3), "median": round(sorted(pauses)[KILLS // 2], 3)}
    print("writer pauses per restart (s):", json.dumps(report))
    if os.environ.get("CISTERN_RESTART_REPORT"):
        Path(os.environ["CISTERN_RESTART_REPORT"]).write_text(json.dumps(report))

    node.flush()
    for name, digest in files.items():
        assert hashlib.sha256(read_object(s3, bucket, f"volumes/pvc-1/{name}")).hexdigest() \
            == digest, name


def test_pyfuse3_refuses_a_held_connection(held_node: Any, bucket: str, tmp_path: Path,
                                           moto: MotoServer, holder: Path) -> None:
    """libfuse answers INIT itself and fails every request that comes before it; a held
    connection never sends INIT again, so pyfuse3 cannot serve it and says so."""
    node = held_node(bucket)
    (node.mount / "x").write_text("kept")
    node.kill_only()
    other = NodeProcess(tmp_path / "node", f"s3://{bucket}", endpoint_url=moto.endpoint,
                        frontend="pyfuse3", extra_args=["--fuse-holder", str(holder)])
    done = subprocess.run(other.command(), env=dict(os.environ, **TEST_CREDENTIALS),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "pyfuse3 front end cannot serve a connection it did not mount" in done.stderr
    node.start()
    assert (node.mount / "x").read_text() == "kept"


def test_a_restarted_holder_gets_the_connection_back(held_node: Any, bucket: str,
                                                     holder_process: HolderProcess) -> None:
    node = held_node(bucket)
    holder_process.stop()  # the daemon holds its own copy: the mount lives on
    (node.mount / "a").write_text("served without a holder")
    holder_process.start()
    wait_until(lambda: "holds our connection again" in node.log(), 30,
               "the daemon to hand its connection to the new holder")
    node.kill_only()
    node.start()
    assert (node.mount / "a").read_text() == "served without a holder"
    assert node.status().fuse.takeovers == 1


def test_the_held_mount_is_served_while_the_object_store_is_down(
        held_node: Any, bucket: str, s3: Any, proxy: Any) -> None:
    """A daemon without S3 refuses to start, except for a held mount: its applications are
    waiting, and write-back needs no S3 to serve them."""
    node = held_node(bucket, endpoint=proxy.endpoint, upload_delay=3600)
    with open(node.mount / "during-outage.bin", "wb") as f:
        f.write(b"written before")
        os.fsync(f.fileno())
        node.kill_only()
        proxy.set(outage=True)
        node.start(timeout=60)
        f.write(b", fsync'd during the outage")
        f.flush()
        os.fsync(f.fileno())
    assert "serving the held mount anyway" in node.log()
    proxy.set(outage=False)
    node.flush()
    assert read_object(s3, bucket, "during-outage.bin") == \
        b"written before, fsync'd during the outage"

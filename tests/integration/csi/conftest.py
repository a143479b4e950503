"""Real parts for the CSI driver tests: the ``cistern-csi`` process on a unix socket, a gRPC
client made from the generated bindings, and real ``cistern-node`` FUSE mounts."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from cistern.csi.mounts import read_mount_table, unmount
from cistern.csi.proto import csi_pb2, csi_pb2_grpc
from cistern.nodestatus import NodeStatus
from support.s3server import free_port, stop_child
from support.wait import WaitTimeout, wait_until

NEEDS_ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="bind mounts need root")
CACHE_NODE = shutil.which("cistern-node")
#: The installed console script; the module form only where the script is not on PATH.
CSI_COMMAND = [shutil.which("cistern-csi") or ""] if shutil.which("cistern-csi") else \
    [sys.executable, "-m", "cistern.csi.cli"]


def require_cache_node() -> None:
    reason = None
    if CACHE_NODE is None:
        reason = "cistern-node is not installed yet; the FUSE end-to-end CSI tests need it"
    elif not os.path.exists("/dev/fuse"):
        reason = "/dev/fuse is missing; the CSI tests need a real FUSE mount"
    elif os.geteuid() != 0:
        reason = "FUSE and bind mounts need root"
    if reason:
        print(f"SKIP: {reason}", file=sys.stderr)
        pytest.skip(reason)


def mount_cap(mode: int = csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER,
              fs_type: str = "", flags: tuple[str, ...] = (),
              mount_group: str = "") -> csi_pb2.VolumeCapability:
    return csi_pb2.VolumeCapability(
        mount=csi_pb2.VolumeCapability.MountVolume(fs_type=fs_type, mount_flags=list(flags),
                                                   volume_mount_group=mount_group),
        access_mode=csi_pb2.VolumeCapability.AccessMode(mode=mode))


def block_cap() -> csi_pb2.VolumeCapability:
    return csi_pb2.VolumeCapability(
        block=csi_pb2.VolumeCapability.BlockVolume(),
        access_mode=csi_pb2.VolumeCapability.AccessMode(
            mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER))


def status_code(call: Any, *args: Any, **kwargs: Any) -> grpc.StatusCode:
    """Call a stub method that must fail; return its status code."""
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    return info.value.code()


def error_of(call: Any, *args: Any, **kwargs: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    return info.value


@dataclass
class Driver:
    """A running ``cistern-csi`` process and stubs for its services."""

    process: subprocess.Popen[bytes]
    socket: str
    log_path: Path
    mount_root: Path
    channel: grpc.Channel
    identity: csi_pb2_grpc.IdentityStub = field(init=False)
    node: csi_pb2_grpc.NodeStub = field(init=False)
    controller: csi_pb2_grpc.ControllerStub = field(init=False)

    def __post_init__(self) -> None:
        self.identity = csi_pb2_grpc.IdentityStub(self.channel)
        self.node = csi_pb2_grpc.NodeStub(self.channel)
        self.controller = csi_pb2_grpc.ControllerStub(self.channel)

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> None:
        self.channel.close()
        stop_child(self.process)


@dataclass
class CacheNode:
    """A running ``cistern-node`` daemon with its FUSE mount at ``<mount-root>/<name>``."""

    name: str
    mount: Path
    store: Path
    control: str
    process: subprocess.Popen[bytes]
    command: list[str]
    log_path: Path

    def status(self) -> NodeStatus:
        with urllib.request.urlopen(f"http://{self.control}/status", timeout=10) as resp:
            return NodeStatus.from_json(json.load(resp))

    def flush(self) -> NodeStatus:
        request = urllib.request.Request(f"http://{self.control}/flush", method="POST", data=b"")
        with urllib.request.urlopen(request, timeout=60) as resp:
            return NodeStatus.from_json(json.load(resp))

    def flush_until(self, relative: str, present: bool = True, timeout: float = 15.0) -> Path:
        """Flush until ``relative`` is (or is no longer) in the object store; return its path.

        The kernel sends FUSE RELEASE after close() has returned, so one flush right after a
        close can still see the file open; flushing again until the store shows it is what a
        user waiting for durability does too.
        """
        stored = self.store / relative

        def flushed() -> bool:
            self.flush()
            return stored.exists() == present

        wait_until(flushed, timeout=timeout, interval=0.1,
                   what=f"{stored} to {'appear' if present else 'go'} in the store")
        return stored

    def restart(self) -> None:
        """Start the daemon again after it died, as its pod would be restarted: first remove
        the dead mount it left (the daemon does not mount over one)."""
        assert self.process.poll() is not None, "restart() is for a daemon that died"
        self._unmount()
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT)
        wait_for_cache(self)

    def kill(self) -> None:
        """Die like a crashed daemon: SIGKILL, the FUSE mount stays behind, dead (ENOTCONN)."""
        self.process.kill()
        self.process.wait()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)  # a test may have stopped it
            stop_child(self.process, timeout=20)
        # A killed daemon leaves its (dead) mount; remove only this daemon's own mount.
        if self._unmount():
            shutil.rmtree(self.mount, ignore_errors=True)

    def _unmount(self) -> bool:
        """Unmount whatever is stacked at the mount point; True when nothing is left."""
        for _ in range(4):
            if read_mount_table().at(self.mount) is None:
                return True
            unmount(str(self.mount))
        return read_mount_table().at(self.mount) is None


def unmount_below(directory: Path) -> None:
    """Remove mounts a failed test left below its own directory (deepest first)."""
    prefix = f"{directory}/"
    for _ in range(8):
        leftovers = sorted((e.mount_point for e in read_mount_table().entries
                            if e.mount_point.startswith(prefix)), key=len, reverse=True)
        if not leftovers:
            return
        for point in leftovers:
            try:
                unmount(point)
            except OSError as exc:
                print(f"cannot unmount leftover {point}: {exc}", file=sys.stderr)


@pytest.fixture(autouse=True)
def _no_leftover_mounts(tmp_path: Path) -> Iterator[None]:
    yield
    unmount_below(tmp_path)


@pytest.fixture(scope="module")
def short_tmp() -> Iterator[Path]:
    """A short directory per test module (unix socket paths are limited to 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="csi-", dir="/tmp"))
    yield path
    unmount_below(path)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def mount_root(short_tmp: Path) -> Path:
    """The module's mount root; tests remove the cache directories they make in it."""
    root = short_tmp / "mounts"
    root.mkdir()
    return root


@pytest.fixture
def make_cache_dir(mount_root: Path) -> Iterator[Any]:
    """Make ``<mount-root>/<name>`` (a cache whose daemon is not running); removed afterwards."""
    made: list[Path] = []

    def make(name: str) -> Path:
        path = mount_root / name
        path.mkdir()
        made.append(path)
        return path

    yield make
    for path in reversed(made):
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def access_dir(short_tmp: Path) -> Path:
    """Where the driver reads the caches' access policies (the operator's ConfigMap)."""
    path = short_tmp / "access"
    path.mkdir()
    return path


@pytest.fixture
def allow(access_dir: Path) -> Iterator[Any]:
    """Publish an access policy as the operator does: ``allow(cache_key, [namespaces])``."""
    written: list[Path] = []

    def write(key: str, namespaces: list[str], write_cache: str = "") -> None:
        path = access_dir / f"{key}.json"
        path.write_text(json.dumps({"writeCache": write_cache or key,
                                    "namespaces": namespaces}))
        written.append(path)

    yield write
    for path in written:
        path.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def start_driver(short_tmp: Path, mount_root: Path, access_dir: Path) -> Iterator[Any]:
    started: list[Driver] = []

    def start(mode: str = "all", node_id: str = "test-node",
              health_timeout: float = 2.0) -> Driver:
        socket = str(short_tmp / f"csi-{len(started)}.sock")
        log_path = short_tmp / f"csi-{len(started)}.log"
        log_file = open(log_path, "wb")  # noqa: SIM115 - owned by the process
        process = subprocess.Popen(
            [*CSI_COMMAND, "--endpoint", f"unix://{socket}",
             "--node-id", node_id, "--mode", mode, "--mount-root", str(mount_root),
             "--access-dir", str(access_dir), "--health-timeout", str(health_timeout)],
            stdout=log_file, stderr=subprocess.STDOUT)
        log_file.close()
        channel = grpc.insecure_channel(f"unix://{socket}")
        try:
            grpc.channel_ready_future(channel).result(timeout=20)
        except grpc.FutureTimeoutError:
            process.kill()
            raise RuntimeError(f"cistern-csi did not listen on {socket}: "
                               f"{log_path.read_text()}") from None
        driver = Driver(process, socket, log_path, mount_root, channel)
        started.append(driver)
        return driver

    yield start
    for driver in started:
        driver.stop()


@pytest.fixture(scope="module")
def driver(start_driver: Any) -> Driver:
    return start_driver()  # type: ignore[no-any-return]


def wait_for_cache(node: CacheNode, timeout: float = 30.0) -> None:
    """Until the daemon's fuse.cistern mount is in the mount table and /status answers."""
    def serving() -> bool:
        if node.process.poll() is not None:
            raise RuntimeError(f"cistern-node exited: {node.log_path.read_text()}")
        entry = read_mount_table().at(node.mount)
        return entry is not None and entry.fstype == "fuse.cistern" and bool(node.status())

    try:
        wait_until(serving, timeout=timeout, what=f"cistern-node to mount {node.mount}",
                   ignore=(OSError,))
    except WaitTimeout as exc:
        raise RuntimeError(f"{exc}: {node.log_path.read_text()}") from None


@pytest.fixture
def start_cache(tmp_path: Path, mount_root: Path) -> Iterator[Any]:
    """Start a real cistern-node for WriteCache ``name`` at ``<mount-root>/<name>``."""
    started: list[CacheNode] = []

    def start(name: str = "ckpt") -> CacheNode:
        require_cache_node()
        mount = mount_root / name
        mount.mkdir(exist_ok=True)
        cache_dir = tmp_path / f"cache-{name}"
        store = tmp_path / f"store-{name}"
        cache_dir.mkdir()
        store.mkdir()
        control = f"127.0.0.1:{free_port()}"
        command = [str(CACHE_NODE), "run", "--mount", str(mount), "--cache-dir", str(cache_dir),
                   "--store", f"file://{store}", "--control", control, "--upload-delay", "0"]
        log_path = tmp_path / f"node-{name}.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        node = CacheNode(name, mount, store, control, process, command, log_path)
        started.append(node)
        wait_for_cache(node)
        return node

    yield start
    for node in started:
        node.stop()

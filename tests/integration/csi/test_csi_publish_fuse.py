"""NodePublishVolume / NodeUnpublishVolume / NodeGetVolumeStats against a real cistern-node.

The cache is a real ``fuse.cistern`` mount of the node daemon at ``<mount-root>/<writecache>``,
the target is a real bind mount, and the object store is the daemon's ``file://`` store, where
flushed files appear under the same relative path.
"""

from __future__ import annotations

import errno
import os
import signal
import stat
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import grpc
import pytest

from cistern.csi.mounts import read_mount_table
from cistern.csi.proto import csi_pb2
from support.wait import wait_until

from .conftest import CacheNode, Driver, error_of, mount_cap, status_code

Mode = csi_pb2.VolumeCapability.AccessMode


def publish(driver: Driver, target: Path, volume_id: str = "ckpt/run-1",
            **kwargs: Any) -> csi_pb2.NodePublishVolumeResponse:
    kwargs.setdefault("volume_capability", mount_cap())
    return driver.node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
        volume_id=volume_id, target_path=str(target), **kwargs))


def unpublish(driver: Driver, target: Path, volume_id: str = "ckpt/run-1"
              ) -> csi_pb2.NodeUnpublishVolumeResponse:
    return driver.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
        volume_id=volume_id, target_path=str(target)))


#: statfs(2) by architecture: the driver's health check of a cache is a statvfs of its mount.
STATFS_SYSCALL = {"x86_64": 137, "aarch64": 43}


def waiting_in_statfs(pid: int) -> bool:
    """True while a thread of process ``pid`` is inside statfs(2) (blocked on a hung FUSE
    daemon: the driver checks the cache with the target's lock held)."""
    number = str(STATFS_SYSCALL[os.uname().machine])
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            if (task / "syscall").read_text().split()[0] == number:
                return True
        except (OSError, IndexError):  # the thread ended meanwhile
            continue
    return False


def mounts_at(path: Path) -> int:
    return sum(1 for e in read_mount_table().entries if e.mount_point == str(path))


@pytest.fixture
def cache(start_cache: Any) -> CacheNode:
    return start_cache("ckpt")  # type: ignore[no-any-return]


def test_publish_writes_through_to_the_object_store(driver: Driver, cache: CacheNode,
                                                    tmp_path: Path) -> None:
    target = tmp_path / "pod" / "volumes" / "ckpt"
    publish(driver, target, volume_id="ckpt/team-a/run-1")
    entry = read_mount_table().at(target)
    assert entry is not None and entry.fstype == "fuse.cistern"
    assert entry.root == "/team-a/run-1"
    # The volume directory was created on first use, in the cache namespace.
    assert (cache.mount / "team-a" / "run-1").is_dir()
    # Group-writable and setgid for the pod's fsGroup; never world-writable (issue 13).
    assert (cache.mount / "team-a" / "run-1").stat().st_mode & 0o7777 == 0o2775
    assert {"nosuid", "nodev"} <= entry.options

    (target / "step-100").mkdir()
    (target / "step-100" / "shard-0.pt").write_bytes(b"weights" * 1000)
    with open(target / "step-100" / "shard-0.pt", "rb+") as f:
        os.fsync(f.fileno())
    stored = cache.flush_until("team-a/run-1/step-100/shard-0.pt")
    assert stored.read_bytes() == b"weights" * 1000

    assert driver.identity.Probe(csi_pb2.ProbeRequest()).ready.value is True
    info = driver.node.NodeGetInfo(csi_pb2.NodeGetInfoRequest())
    assert info.accessible_topology.segments["csi.cistern.dev/ckpt"] == "true"

    unpublish(driver, target, "ckpt/team-a/run-1")
    assert read_mount_table().at(target) is None
    assert not target.exists()
    # Unpublishing never deletes data.
    assert (cache.mount / "team-a" / "run-1" / "step-100" / "shard-0.pt").exists()
    assert stored.exists()


def test_publish_and_unpublish_are_idempotent(driver: Driver, cache: CacheNode,
                                              tmp_path: Path) -> None:
    target = tmp_path / "target"
    publish(driver, target)
    publish(driver, target)
    assert mounts_at(target) == 1
    # The same target with another volume, or another access, conflicts: ALREADY_EXISTS.
    err = error_of(publish, driver, target, volume_id="ckpt/run-2")
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS
    assert status_code(publish, driver, target, readonly=True) == grpc.StatusCode.ALREADY_EXISTS
    assert mounts_at(target) == 1
    unpublish(driver, target)
    unpublish(driver, target)
    assert mounts_at(target) == 0 and not target.exists()


def test_read_only_publish_refuses_writes(driver: Driver, cache: CacheNode,
                                          tmp_path: Path) -> None:
    writer, reader, reader_mode = tmp_path / "w", tmp_path / "r", tmp_path / "rm"
    publish(driver, writer)
    (writer / "model.pt").write_bytes(b"abc")
    publish(driver, reader, readonly=True)
    publish(driver, reader_mode, volume_capability=mount_cap(mode=Mode.MULTI_NODE_READER_ONLY))
    for target in (reader, reader_mode):
        assert (target / "model.pt").read_bytes() == b"abc"
        with pytest.raises(OSError) as info:
            (target / "new.pt").write_bytes(b"x")
        assert info.value.errno == errno.EROFS
        entry = read_mount_table().at(target)
        assert entry is not None and entry.read_only
        assert {"nosuid", "nodev"} <= entry.options  # the read-only remount keeps them
    # The writer's mount stays writable: the read-only bind did not change the cache.
    (writer / "more.pt").write_bytes(b"y")
    for target in (writer, reader, reader_mode):
        unpublish(driver, target)


def test_inline_ephemeral_volume_uses_its_context(driver: Driver, start_cache: Any,
                                                  allow: Any, tmp_path: Path) -> None:
    cache: CacheNode = start_cache("team-a.ckpt")
    allow("team-a.ckpt", ["team-a"], "team-a/ckpt")
    target = tmp_path / "inline"
    publish(driver, target, volume_id="csi-5f0c9a1e7d2b",
            volume_context={"writeCache": "ckpt", "path": "jobs/llama/ckpt",
                            "csi.storage.k8s.io/ephemeral": "true",
                            "csi.storage.k8s.io/pod.name": "trainer-0",
                            "csi.storage.k8s.io/pod.namespace": "team-a"})
    (target / "rank0.bin").write_bytes(b"r0")
    assert (cache.mount / "jobs" / "llama" / "ckpt" / "rank0.bin").read_bytes() == b"r0"
    unpublish(driver, target, "csi-5f0c9a1e7d2b")
    unpublish(driver, target, "csi-5f0c9a1e7d2b")  # the kubelet's id: OK again, not NOT_FOUND
    assert not target.exists()
    assert (cache.mount / "jobs" / "llama" / "ckpt" / "rank0.bin").exists()


def test_inline_volume_from_another_namespace_is_denied(driver: Driver, start_cache: Any,
                                                       allow: Any, tmp_path: Path) -> None:
    """Issue 13: a pod in team-b names team-a's cache in an inline volume."""
    cache: CacheNode = start_cache("team-a.ckpt")
    (cache.mount / "secret-run").mkdir()
    (cache.mount / "secret-run" / "weights.pt").write_bytes(b"team-a only")
    allow("team-a.ckpt", ["team-a"], "team-a/ckpt")
    target = tmp_path / "stolen"
    context = {"writeCache": "ckpt", "writeCacheNamespace": "team-a", "path": "secret-run",
               "csi.storage.k8s.io/ephemeral": "true",
               "csi.storage.k8s.io/pod.namespace": "team-b"}
    err = error_of(publish, driver, target, volume_id="csi-0badc0de", volume_context=context)
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "'team-b'" in err.details() and "team-a/ckpt" in err.details()
    assert read_mount_table().at(target) is None
    # Without the pod's namespace (podInfoOnMount off) an inline volume is refused too.
    anonymous = {k: v for k, v in context.items() if k != "csi.storage.k8s.io/pod.namespace"}
    assert status_code(publish, driver, target, volume_id="csi-0badc0de",
                       volume_context=anonymous) == grpc.StatusCode.PERMISSION_DENIED
    # The same pod namespace against its own (absent) cache: no policy, no access.
    own = {**context, "writeCacheNamespace": "team-b"}
    assert status_code(publish, driver, target, volume_id="csi-0badc0de",
                       volume_context=own) == grpc.StatusCode.PERMISSION_DENIED
    # Shared on purpose: team-a's WriteCache lists team-b.
    allow("team-a.ckpt", ["team-a", "team-b"], "team-a/ckpt")
    publish(driver, target, volume_id="csi-0badc0de", volume_context=context)
    assert (target / "weights.pt").read_bytes() == b"team-a only"
    unpublish(driver, target, "csi-0badc0de")


def test_a_pod_in_the_fs_group_can_write_others_cannot(driver: Driver, cache: CacheNode,
                                                         short_tmp: Path) -> None:
    pod_dir = short_tmp / "pod-nonroot"
    pod_dir.mkdir()
    pod_dir.chmod(0o755)
    short_tmp.chmod(0o755)
    target = pod_dir / "volume"
    fs_group = 2345
    publish(driver, target, volume_id="ckpt/shared/run-9",
            volume_capability=mount_cap(mount_group=str(fs_group)))
    try:
        volume_dir = cache.mount / "shared" / "run-9"
        assert volume_dir.stat().st_gid == fs_group
        assert volume_dir.stat().st_mode & 0o7777 == 0o2775

        def write_as(groups: list[int], name: str) -> subprocess.CompletedProcess[str]:
            script = (f"import os; os.setgroups({groups}); os.setgid(65534); os.setuid(65534); "
                      f"open({str(target / name)!r}, 'wb').write(b'from nobody')")
            return subprocess.run([sys.executable, "-c", script], capture_output=True,
                                  text=True, timeout=30)

        result = write_as([fs_group], "rank1.bin")  # a pod with fsGroup 2345
        assert result.returncode == 0, result.stderr
        written = volume_dir / "rank1.bin"
        assert written.read_bytes() == b"from nobody"
        assert written.stat().st_uid == 65534
        refused = write_as([], "intruder.bin")  # same uid, not in the group
        assert refused.returncode != 0 and "Permission denied" in refused.stderr
    finally:
        unpublish(driver, target, "ckpt/shared/run-9")


def test_bad_mount_group_is_invalid(driver: Driver, cache: CacheNode, tmp_path: Path) -> None:
    assert status_code(publish, driver, tmp_path / "t", volume_id="ckpt/g",
                       volume_capability=mount_cap(mount_group="wheel")) \
        == grpc.StatusCode.INVALID_ARGUMENT


def test_volume_stats_report_bytes_and_inodes(driver: Driver, cache: CacheNode,
                                              tmp_path: Path) -> None:
    target = tmp_path / "target"
    publish(driver, target)
    (target / "blob").write_bytes(os.urandom(1 << 20))
    stats = driver.node.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(
        volume_id="ckpt/run-1", volume_path=str(target)))
    usage = {u.unit: u for u in stats.usage}
    st = os.statvfs(target)
    by, ino = usage[csi_pb2.VolumeUsage.BYTES], usage[csi_pb2.VolumeUsage.INODES]
    assert by.total == st.f_blocks * st.f_frsize > 0
    assert 0 < by.used <= by.total and 0 <= by.available <= by.total
    assert ino.total == st.f_files and 0 <= ino.used <= ino.total
    assert not stats.volume_condition.abnormal
    unpublish(driver, target)


def test_a_dead_daemon_is_unavailable_and_unpublish_still_cleans_up(
        driver: Driver, cache: CacheNode, tmp_path: Path) -> None:
    target = tmp_path / "target"
    publish(driver, target)
    (target / "before-crash").write_bytes(b"1")
    cache.kill()  # SIGKILL: the FUSE mount stays in the mount table, dead (ENOTCONN)

    assert driver.identity.Probe(csi_pb2.ProbeRequest()).ready.value is False
    other = tmp_path / "other"
    err = error_of(publish, driver, other, volume_id="ckpt/run-2")
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert "broken" in err.details()
    assert read_mount_table().at(other) is None and not other.exists()
    stats = driver.node.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(
        volume_id="ckpt/run-1", volume_path=str(target)))
    assert stats.volume_condition.abnormal and not stats.usage

    unpublish(driver, target)
    assert read_mount_table().at(target) is None
    assert not os.path.lexists(target)


def test_republish_after_a_daemon_restart_replaces_the_dead_bind(
        driver: Driver, cache: CacheNode, tmp_path: Path) -> None:
    target = tmp_path / "target"
    publish(driver, target)
    with open(target / "model.pt", "wb") as f:
        f.write(b"durable")
        os.fsync(f.fileno())
    cache.kill()
    cache.restart()  # a new FUSE connection at the same mount point; the pod's bind is dead
    with pytest.raises(OSError) as info:
        os.listdir(target)
    assert info.value.errno == errno.ENOTCONN
    # The same volume again (what the kubelet does when it reconciles): replaced, not refused.
    publish(driver, target)
    assert mounts_at(target) == 1
    assert (target / "model.pt").read_bytes() == b"durable"
    # A different volume at the target is still a conflict.
    assert status_code(publish, driver, target, volume_id="ckpt/other") \
        == grpc.StatusCode.ALREADY_EXISTS
    unpublish(driver, target)


def test_concurrent_calls_on_one_target_are_aborted(start_driver: Any, cache: CacheNode,
                                                    tmp_path: Path) -> None:
    if os.uname().machine not in STATFS_SYSCALL:
        pytest.skip(f"the statfs syscall number of {os.uname().machine} is not listed here")
    driver = start_driver(health_timeout=3.0)
    target = tmp_path / "target"
    cache.process.send_signal(signal.SIGSTOP)  # the daemon hangs: the health check blocks
    try:
        first: dict[str, Any] = {}

        def slow_publish() -> None:
            try:
                publish(driver, target)
            except grpc.RpcError as exc:
                first["code"] = exc.code()

        thread = threading.Thread(target=slow_publish)
        thread.start()
        wait_until(lambda: waiting_in_statfs(driver.process.pid), timeout=2.5, interval=0.01,
                   what="the first publish to hold the target, waiting on the hung cache")
        assert status_code(publish, driver, target) == grpc.StatusCode.ABORTED
        assert status_code(unpublish, driver, target) == grpc.StatusCode.ABORTED
        thread.join(timeout=30)
        assert first["code"] == grpc.StatusCode.UNAVAILABLE  # hung daemon: not published
        assert read_mount_table().at(target) is None
    finally:
        cache.process.send_signal(signal.SIGCONT)
    publish(driver, target)  # with the daemon back, the same call succeeds
    unpublish(driver, target)


def test_setuid_from_the_bucket_never_reaches_a_read_only_publish(
        driver: Driver, cache: CacheNode, tmp_path: Path) -> None:
    """Issue 13: whoever can write the bucket plants a setuid-root file; a pod reading the
    volume read-only must get neither the bit nor a mount that would honour it."""
    planted = cache.store / "planted" / "su"
    planted.parent.mkdir()
    planted.write_bytes(b"#!/bin/sh\nid\n")
    os.chown(planted, 0, 0)
    planted.chmod(0o6755)  # the file:// store's metadata is the file's own mode
    target = tmp_path / "ro"
    publish(driver, target, volume_id="ckpt/planted", readonly=True)
    try:
        assert (target / "su").read_bytes() == b"#!/bin/sh\nid\n"  # fetched: metadata applied
        mode = (target / "su").stat().st_mode
        assert mode & (stat.S_ISUID | stat.S_ISGID) == 0, oct(mode)
        assert mode & 0o777 == 0o755  # the rest of the mode is kept
        for point in (target, cache.mount):
            entry = read_mount_table().at(point)
            assert entry is not None and {"nosuid", "nodev"} <= entry.options, (point, entry)
    finally:
        unpublish(driver, target, "ckpt/planted")

"""cistern-csi on a unix socket: Identity, and the status codes for bad or impossible calls.

No cache daemon is needed here: these calls fail (or answer) before any cache is touched, or
the test is about a cache that is absent, down, or replaced by a foreign file system.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Any

import grpc
import pytest

from cistern.csi.mounts import read_mount_table, unmount
from cistern.csi.proto import csi_pb2

from .conftest import NEEDS_ROOT, Driver, block_cap, error_of, mount_cap, status_code

Mode = csi_pb2.VolumeCapability.AccessMode
Service = csi_pb2.PluginCapability.Service


def publish(driver: Driver, target: Path | str, volume_id: str = "ckpt/vol",
            **kwargs: Any) -> csi_pb2.NodePublishVolumeResponse:
    kwargs.setdefault("volume_capability", mount_cap())
    return driver.node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
        volume_id=volume_id, target_path=str(target), **kwargs))


def test_plugin_info_names_the_driver_and_its_version(driver: Driver) -> None:
    info = driver.identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest())
    assert info.name == "csi.cistern.dev"
    assert info.vendor_version  # the installed distribution's version
    assert info.manifest["mode"] == "all"


def test_capabilities_follow_the_mode(start_driver: Any) -> None:
    everything = start_driver(mode="all")
    node_only = start_driver(mode="node")
    all_caps = {c.service.type for c in everything.identity.GetPluginCapabilities(
        csi_pb2.GetPluginCapabilitiesRequest()).capabilities}
    node_caps = {c.service.type for c in node_only.identity.GetPluginCapabilities(
        csi_pb2.GetPluginCapabilitiesRequest()).capabilities}
    assert all_caps == {Service.CONTROLLER_SERVICE, Service.VOLUME_ACCESSIBILITY_CONSTRAINTS}
    assert node_caps == {Service.VOLUME_ACCESSIBILITY_CONSTRAINTS}


def test_services_outside_the_mode_are_unimplemented(start_driver: Any) -> None:
    node_only = start_driver(mode="node")
    controller_only = start_driver(mode="controller", node_id="")
    assert status_code(node_only.controller.ControllerGetCapabilities,
                       csi_pb2.ControllerGetCapabilitiesRequest()) == grpc.StatusCode.UNIMPLEMENTED
    assert status_code(controller_only.node.NodeGetInfo,
                       csi_pb2.NodeGetInfoRequest()) == grpc.StatusCode.UNIMPLEMENTED
    # RPCs Cistern does not offer at all answer UNIMPLEMENTED too.
    assert status_code(node_only.node.NodeStageVolume, csi_pb2.NodeStageVolumeRequest(
        volume_id="ckpt/x", staging_target_path="/x",
        volume_capability=mount_cap())) == grpc.StatusCode.UNIMPLEMENTED
    # The controller alone needs no cache: it is ready.
    assert controller_only.identity.Probe(csi_pb2.ProbeRequest()).ready.value is True


def test_probe_is_not_ready_without_a_cache(driver: Driver, make_cache_dir: Any) -> None:
    assert driver.identity.Probe(csi_pb2.ProbeRequest()).ready.value is False
    make_cache_dir("ckpt")  # the daemon's mount point, but no daemon
    assert driver.identity.Probe(csi_pb2.ProbeRequest()).ready.value is False


def test_node_capabilities_include_volume_stats(driver: Driver) -> None:
    caps = {c.rpc.type for c in driver.node.NodeGetCapabilities(
        csi_pb2.NodeGetCapabilitiesRequest()).capabilities}
    assert csi_pb2.NodeServiceCapability.RPC.GET_VOLUME_STATS in caps


@pytest.mark.parametrize("request_fields, problem", [
    ({"volume_id": ""}, "volume_id"),
    ({"target_path": ""}, "target_path"),
    ({"target_path": "relative/dir"}, "target_path"),
    ({"volume_capability": None}, "volume_capability"),
    ({"volume_capability": block_cap()}, "block"),
    ({"volume_capability": mount_cap(mode=Mode.UNKNOWN)}, "access_mode"),
    ({"volume_capability": mount_cap(fs_type="ext4")}, "fs_type"),
    ({"volume_capability": mount_cap(flags=("uid=0",))}, "mount flag"),
    ({"volume_id": "ckpt/../other"}, "'..'"),
    ({"volume_context": {"writeCache": "ckpt"}}, "go together"),
    ({"volume_context": {"writeCache": "Bad_Name", "path": "x"}}, "WriteCache name"),
])
def test_publish_rejects_bad_arguments(driver: Driver, tmp_path: Path,
                                       request_fields: dict[str, Any], problem: str) -> None:
    fields: dict[str, Any] = {"volume_id": "ckpt/vol", "target_path": str(tmp_path / "target"),
                              "volume_capability": mount_cap()}
    fields.update(request_fields)
    if fields["volume_capability"] is None:
        del fields["volume_capability"]
    err = error_of(driver.node.NodePublishVolume, csi_pb2.NodePublishVolumeRequest(**fields))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert problem in err.details()
    assert not (tmp_path / "target").exists()


def test_unknown_volumes_are_not_found(driver: Driver, tmp_path: Path) -> None:
    target = tmp_path / "target"
    err = error_of(publish, driver, target, volume_id="csi-0123abcd")  # no context, no cache
    assert err.code() == grpc.StatusCode.NOT_FOUND
    err = error_of(publish, driver, target, volume_id="nosuchcache/vol")
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert "nosuchcache" in err.details()
    # Unpublish: a well-formed id of a cache this node does not have, nothing at the target.
    assert status_code(driver.node.NodeUnpublishVolume, csi_pb2.NodeUnpublishVolumeRequest(
        volume_id="nosuchcache/vol", target_path=str(target))) == grpc.StatusCode.NOT_FOUND
    assert not target.exists()


def test_unpublish_and_stats_reject_missing_arguments(driver: Driver) -> None:
    for fields in ({"target_path": "/x"}, {"volume_id": "ckpt/x"}):
        assert status_code(driver.node.NodeUnpublishVolume,
                           csi_pb2.NodeUnpublishVolumeRequest(**fields)
                           ) == grpc.StatusCode.INVALID_ARGUMENT
    for fields in ({"volume_path": "/x"}, {"volume_id": "ckpt/x"}):
        assert status_code(driver.node.NodeGetVolumeStats,
                           csi_pb2.NodeGetVolumeStatsRequest(**fields)
                           ) == grpc.StatusCode.INVALID_ARGUMENT


def test_stats_of_a_path_that_is_no_volume_is_not_found(driver: Driver, tmp_path: Path) -> None:
    for path in (tmp_path / "missing", tmp_path):
        err = error_of(driver.node.NodeGetVolumeStats, csi_pb2.NodeGetVolumeStatsRequest(
            volume_id="ckpt/x", volume_path=str(path)))
        assert err.code() == grpc.StatusCode.NOT_FOUND


def test_a_cache_whose_daemon_is_down_is_unavailable(driver: Driver, mount_root: Path,
                                                     make_cache_dir: Any, tmp_path: Path) -> None:
    make_cache_dir("ckpt")
    target = tmp_path / "target"
    err = error_of(publish, driver, target)
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert "not running" in err.details()
    # Never an empty directory in place of the cache: nothing was created or mounted.
    assert not target.exists()
    assert not (mount_root / "ckpt" / "vol").exists()


@NEEDS_ROOT
def test_a_foreign_file_system_at_the_cache_path_is_refused(driver: Driver, make_cache_dir: Any,
                                                            tmp_path: Path) -> None:
    cache = make_cache_dir("ckpt")
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    assert libc.mount(b"tmpfs", str(cache).encode(), b"tmpfs", 0, b"size=1m") == 0, \
        os.strerror(ctypes.get_errno())
    try:
        target = tmp_path / "target"
        err = error_of(publish, driver, target)
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "tmpfs" in err.details()
        assert read_mount_table().at(target) is None
        assert not (cache / "vol").exists()
    finally:
        unmount(str(cache))


def test_node_info_reports_the_node_and_its_caches(driver: Driver, make_cache_dir: Any) -> None:
    info = driver.node.NodeGetInfo(csi_pb2.NodeGetInfoRequest())
    assert info.node_id == "test-node"
    assert dict(info.accessible_topology.segments) == {}
    make_cache_dir("ckpt")
    make_cache_dir("datasets")
    info = driver.node.NodeGetInfo(csi_pb2.NodeGetInfoRequest())
    assert dict(info.accessible_topology.segments) == {
        "csi.cistern.dev/ckpt": "true", "csi.cistern.dev/datasets": "true"}

"""The Controller service over the unix socket: provisioning, deletion, validation."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import grpc
import pytest

from cistern.csi.proto import csi_pb2

from .conftest import CacheNode, Driver, block_cap, error_of, mount_cap, status_code

Mode = csi_pb2.VolumeCapability.AccessMode
SECRET = "s3cr3t-value-that-must-not-be-logged"


def create(driver: Driver, name: str = "pvc-1b2c3d4e-0000-1111-2222-333344445555",
           parameters: dict[str, str] | None = None, **kwargs: Any) -> csi_pb2.Volume:
    kwargs.setdefault("volume_capabilities", [mount_cap(Mode.MULTI_NODE_MULTI_WRITER)])
    response = driver.controller.CreateVolume(csi_pb2.CreateVolumeRequest(
        name=name, parameters={"writeCache": "ckpt"} if parameters is None else parameters,
        **kwargs))
    return response.volume


def test_controller_capabilities(driver: Driver) -> None:
    caps = {c.rpc.type for c in driver.controller.ControllerGetCapabilities(
        csi_pb2.ControllerGetCapabilitiesRequest()).capabilities}
    assert csi_pb2.ControllerServiceCapability.RPC.CREATE_DELETE_VOLUME in caps


def test_create_volume_is_named_after_the_pvc_and_idempotent(driver: Driver,
                                                            allow: Any) -> None:
    allow("team-a.ckpt", ["team-a"])
    params = {"writeCache": "ckpt", "csi.storage.k8s.io/pvc/name": "llama-ckpt",
              "csi.storage.k8s.io/pvc/namespace": "team-a"}
    first = create(driver, parameters=params)
    again = create(driver, parameters=params)
    assert first.volume_id == "team-a.ckpt/team-a/llama-ckpt-1b2c3d4e"
    assert again == first
    assert dict(first.volume_context) == {"writeCache": "ckpt", "writeCacheNamespace": "team-a",
                                          "path": "team-a/llama-ckpt-1b2c3d4e"}
    # Without PVC metadata, the CO's volume name is the directory.
    plain = create(driver, name="pvc-aaaa")
    assert plain.volume_id == "ckpt/pvc-aaaa"


def test_create_volume_capacity(driver: Driver) -> None:
    assert create(driver, name="pvc-c1").capacity_bytes == 0  # unknown: not asked for
    asked = csi_pb2.CapacityRange(required_bytes=10 << 30, limit_bytes=20 << 30)
    assert create(driver, name="pvc-c2", capacity_range=asked).capacity_bytes == 10 << 30
    only_limit = csi_pb2.CapacityRange(limit_bytes=5 << 30)
    assert create(driver, name="pvc-c3", capacity_range=only_limit).capacity_bytes == 5 << 30
    inverted = csi_pb2.CapacityRange(required_bytes=2 << 30, limit_bytes=1 << 30)
    assert status_code(create, driver, name="pvc-c4", capacity_range=inverted) \
        == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("kwargs, problem", [
    ({"name": ""}, "name"),
    ({"volume_capabilities": []}, "volume_capabilities"),
    ({"volume_capabilities": [block_cap()]}, "block"),
    ({"parameters": {}}, "writeCache"),
    ({"parameters": {"writeCache": "ckpt", "bucket": "x"}}, "bucket"),
    ({"parameters": {"writeCache": "../etc"}}, "WriteCache name"),
    ({"volume_content_source": csi_pb2.VolumeContentSource(
        snapshot=csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id="s"))}, "snapshot"),
])
def test_create_volume_rejects_bad_requests(driver: Driver, kwargs: dict[str, Any],
                                            problem: str) -> None:
    err = error_of(create, driver, **kwargs)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert problem in err.details()


def test_create_volume_honours_topology(driver: Driver) -> None:
    here = csi_pb2.TopologyRequirement(requisite=[
        csi_pb2.Topology(segments={"csi.cistern.dev/ckpt": "true",
                                   "csi.cistern.dev/datasets": "true"})])
    pinned = create(driver, name="pvc-topo-1", accessibility_requirements=here)
    assert [dict(t.segments) for t in pinned.accessible_topology] == [
        {"csi.cistern.dev/ckpt": "true"}]
    nowhere = csi_pb2.TopologyRequirement(requisite=[
        csi_pb2.Topology(segments={"csi.cistern.dev/ckpt": "false"})])
    assert status_code(create, driver, name="pvc-topo-4", accessibility_requirements=nowhere) \
        == grpc.StatusCode.RESOURCE_EXHAUSTED
    # A key the CO has never seen (no node registered it yet): no pinning, or the volume
    # could never be used; the node plugin answers NOT_FOUND where the cache is missing.
    unseen = csi_pb2.TopologyRequirement(requisite=[
        csi_pb2.Topology(segments={"csi.cistern.dev/datasets": "true"})])
    assert not create(driver, name="pvc-topo-2",
                      accessibility_requirements=unseen).accessible_topology
    assert not create(driver, name="pvc-topo-3").accessible_topology


def test_validate_volume_capabilities(driver: Driver) -> None:
    validate = driver.controller.ValidateVolumeCapabilities
    ok = validate(csi_pb2.ValidateVolumeCapabilitiesRequest(
        volume_id="ckpt/run-1", volume_capabilities=[mount_cap(Mode.MULTI_NODE_MULTI_WRITER)]))
    assert list(ok.confirmed.volume_capabilities) == [mount_cap(Mode.MULTI_NODE_MULTI_WRITER)]
    refused = validate(csi_pb2.ValidateVolumeCapabilitiesRequest(
        volume_id="ckpt/run-1", volume_capabilities=[block_cap()]))
    assert not refused.HasField("confirmed") and "block" in refused.message
    assert status_code(validate, csi_pb2.ValidateVolumeCapabilitiesRequest(
        volume_id="not-a-cistern-volume", volume_capabilities=[mount_cap()])
    ) == grpc.StatusCode.NOT_FOUND
    assert status_code(validate, csi_pb2.ValidateVolumeCapabilitiesRequest(
        volume_id="ckpt/run-1")) == grpc.StatusCode.INVALID_ARGUMENT
    assert status_code(validate, csi_pb2.ValidateVolumeCapabilitiesRequest(
        volume_capabilities=[mount_cap()])) == grpc.StatusCode.INVALID_ARGUMENT


def test_delete_volume_argument_and_absent_cases(driver: Driver) -> None:
    delete = driver.controller.DeleteVolume
    assert status_code(delete, csi_pb2.DeleteVolumeRequest()) == grpc.StatusCode.INVALID_ARGUMENT
    delete(csi_pb2.DeleteVolumeRequest(volume_id="not-a-cistern-volume"))  # nothing: OK
    # The data lives in a cache this controller cannot reach: refuse, delete nothing.
    err = error_of(delete, csi_pb2.DeleteVolumeRequest(volume_id="elsewhere/pvc-x"))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_provisioned_volume_lifecycle(driver: Driver, start_cache: Any, tmp_path: Path,
                                      allow: Any) -> None:
    cache: CacheNode = start_cache("ml.ckpt")
    allow("ml.ckpt", ["ml"])
    params = {"writeCache": "ckpt", "csi.storage.k8s.io/pvc/name": "run",
              "csi.storage.k8s.io/pvc/namespace": "ml"}
    volume = create(driver, name="pvc-1b2c3d4e-life", parameters=params,
                    secrets={"token": SECRET})
    target = tmp_path / "pod-volume"
    driver.node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
        volume_id=volume.volume_id, target_path=str(target),
        volume_capability=mount_cap(Mode.MULTI_NODE_MULTI_WRITER),
        volume_context=volume.volume_context, secrets={"token": SECRET}))
    (target / "step-1").mkdir()
    (target / "step-1" / "model.pt").write_bytes(b"m" * 4096)
    stored = cache.flush_until("ml/run-1b2c3d4e/step-1/model.pt")
    assert stored.read_bytes() == b"m" * 4096
    # A sibling volume in the same namespace directory must survive the deletion.
    (cache.mount / "ml" / "other").mkdir()

    driver.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
        volume_id=volume.volume_id, target_path=str(target)))
    driver.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(
        volume_id=volume.volume_id, secrets={"token": SECRET}))
    assert not (cache.mount / "ml" / "run-1b2c3d4e").exists()
    assert (cache.mount / "ml" / "other").is_dir()
    cache.flush_until("ml/run-1b2c3d4e/step-1/model.pt", present=False)
    driver.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume.volume_id))

    log = driver.log()
    assert "CreateVolume call" in log and "NodePublishVolume call" in log
    assert SECRET not in log
    assert 'value: "***"' in log
    assert "Logging error" not in log and "Traceback" not in log
    assert os.path.isdir(cache.mount)


def test_create_volume_same_name_incompatible_capacity_is_already_exists(
        driver: Driver) -> None:
    """csi-sanity: an existing name with a capacity that does not fit is ALREADY_EXISTS."""
    small = csi_pb2.CapacityRange(required_bytes=1 << 30)
    first = create(driver, name="pvc-cap-1", capacity_range=small)
    assert create(driver, name="pvc-cap-1", capacity_range=small) == first
    bigger = csi_pb2.CapacityRange(required_bytes=2 << 30)
    assert status_code(create, driver, name="pvc-cap-1", capacity_range=bigger) \
        == grpc.StatusCode.ALREADY_EXISTS
    # Compatible: the existing 1 GiB volume fits "at most 4 GiB".
    assert create(driver, name="pvc-cap-1", capacity_range=csi_pb2.CapacityRange(
        limit_bytes=4 << 30)).volume_id == first.volume_id
    assert status_code(create, driver, name="pvc-cap-1",
                       parameters={"writeCache": "other"}) == grpc.StatusCode.ALREADY_EXISTS


@pytest.mark.parametrize("name", ["n" * 128, "é" * 64])
def test_create_volume_accepts_a_128_byte_name(driver: Driver, name: str) -> None:
    volume = create(driver, name=name, parameters={
        "writeCache": "c" * 63, "writeCacheNamespace": "n" * 63})
    assert len(volume.volume_id.encode()) <= 128
    assert create(driver, name=name, parameters={
        "writeCache": "c" * 63, "writeCacheNamespace": "n" * 63}) == volume


def test_create_volume_refuses_a_namespace_the_cache_does_not_admit(
        driver: Driver, allow: Any) -> None:
    allow("team-a.ckpt", ["team-a"], "team-a/ckpt")
    params = {"writeCache": "ckpt", "writeCacheNamespace": "team-a",
              "csi.storage.k8s.io/pvc/name": "steal", "csi.storage.k8s.io/pvc/namespace": "team-b"}
    err = error_of(create, driver, name="pvc-steal", parameters=params)
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "team-b" in err.details() and "team-a/ckpt" in err.details()
    allow("team-a.ckpt", ["team-a", "team-b"], "team-a/ckpt")
    assert create(driver, name="pvc-steal", parameters=params).volume_id.startswith(
        "team-a.ckpt/team-b/steal-")
    # A cache without a policy admits nobody.
    err = error_of(create, driver, name="pvc-x", parameters={
        **params, "writeCacheNamespace": "team-c"})
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED

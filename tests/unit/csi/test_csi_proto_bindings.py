"""The committed CSI bindings are fresh, and csi.proto is wire-compatible with CSI v1."""

from __future__ import annotations

import pytest
from google.protobuf.descriptor import FieldDescriptor

from cistern.csi import protogen
from cistern.csi.proto import csi_pb2

# (message, field, number) pairs from the upstream csi.v1 spec: what a CO puts on the wire.
UPSTREAM_FIELDS = [
    ("GetPluginInfoResponse", "name", 1), ("GetPluginInfoResponse", "vendor_version", 2),
    ("GetPluginInfoResponse", "manifest", 3),
    ("GetPluginCapabilitiesResponse", "capabilities", 1),
    ("PluginCapability", "service", 1), ("PluginCapability", "volume_expansion", 2),
    ("ProbeResponse", "ready", 1),
    ("CreateVolumeRequest", "name", 1), ("CreateVolumeRequest", "capacity_range", 2),
    ("CreateVolumeRequest", "volume_capabilities", 3), ("CreateVolumeRequest", "parameters", 4),
    ("CreateVolumeRequest", "secrets", 5), ("CreateVolumeRequest", "volume_content_source", 6),
    ("CreateVolumeRequest", "accessibility_requirements", 7),
    ("CreateVolumeRequest", "mutable_parameters", 8),
    ("CreateVolumeResponse", "volume", 1),
    ("Volume", "capacity_bytes", 1), ("Volume", "volume_id", 2),
    ("Volume", "volume_context", 3), ("Volume", "content_source", 4),
    ("Volume", "accessible_topology", 5),
    ("VolumeCapability", "block", 1), ("VolumeCapability", "mount", 2),
    ("VolumeCapability", "access_mode", 3),
    ("VolumeCapability.MountVolume", "fs_type", 1),
    ("VolumeCapability.MountVolume", "mount_flags", 2),
    ("VolumeCapability.MountVolume", "volume_mount_group", 3),
    ("CapacityRange", "required_bytes", 1), ("CapacityRange", "limit_bytes", 2),
    ("TopologyRequirement", "requisite", 1), ("TopologyRequirement", "preferred", 2),
    ("Topology", "segments", 1),
    ("DeleteVolumeRequest", "volume_id", 1), ("DeleteVolumeRequest", "secrets", 2),
    ("ValidateVolumeCapabilitiesRequest", "volume_id", 1),
    ("ValidateVolumeCapabilitiesRequest", "volume_context", 2),
    ("ValidateVolumeCapabilitiesRequest", "volume_capabilities", 3),
    ("ValidateVolumeCapabilitiesRequest", "parameters", 4),
    ("ValidateVolumeCapabilitiesRequest", "secrets", 5),
    ("ValidateVolumeCapabilitiesResponse", "confirmed", 1),
    ("ValidateVolumeCapabilitiesResponse", "message", 2),
    ("ControllerGetCapabilitiesResponse", "capabilities", 1),
    ("ControllerPublishVolumeRequest", "readonly", 4),
    ("ControllerPublishVolumeRequest", "volume_context", 6),
    ("GetCapacityResponse", "available_capacity", 1),
    ("GetCapacityResponse", "maximum_volume_size", 2),
    ("Snapshot", "creation_time", 4), ("Snapshot", "ready_to_use", 5),
    ("NodeStageVolumeRequest", "staging_target_path", 3),
    ("NodePublishVolumeRequest", "volume_id", 1),
    ("NodePublishVolumeRequest", "publish_context", 2),
    ("NodePublishVolumeRequest", "staging_target_path", 3),
    ("NodePublishVolumeRequest", "target_path", 4),
    ("NodePublishVolumeRequest", "volume_capability", 5),
    ("NodePublishVolumeRequest", "readonly", 6),
    ("NodePublishVolumeRequest", "secrets", 7),
    ("NodePublishVolumeRequest", "volume_context", 8),
    ("NodeUnpublishVolumeRequest", "volume_id", 1),
    ("NodeUnpublishVolumeRequest", "target_path", 2),
    ("NodeGetVolumeStatsRequest", "volume_id", 1),
    ("NodeGetVolumeStatsRequest", "volume_path", 2),
    ("NodeGetVolumeStatsRequest", "staging_target_path", 3),
    ("NodeGetVolumeStatsResponse", "usage", 1),
    ("NodeGetVolumeStatsResponse", "volume_condition", 2),
    ("VolumeUsage", "available", 1), ("VolumeUsage", "total", 2), ("VolumeUsage", "used", 3),
    ("VolumeUsage", "unit", 4),
    ("VolumeCondition", "abnormal", 1), ("VolumeCondition", "message", 2),
    ("NodeGetCapabilitiesResponse", "capabilities", 1),
    ("NodeGetInfoResponse", "node_id", 1), ("NodeGetInfoResponse", "max_volumes_per_node", 2),
    ("NodeGetInfoResponse", "accessible_topology", 3),
    ("NodeExpandVolumeRequest", "volume_path", 2),
]

UPSTREAM_SERVICES = {
    "Identity": ["GetPluginInfo", "GetPluginCapabilities", "Probe"],
    "Controller": ["CreateVolume", "DeleteVolume", "ControllerPublishVolume",
                   "ControllerUnpublishVolume", "ValidateVolumeCapabilities", "ListVolumes",
                   "GetCapacity", "ControllerGetCapabilities", "CreateSnapshot",
                   "DeleteSnapshot", "ListSnapshots", "GetSnapshot", "ControllerExpandVolume",
                   "ControllerGetVolume", "ControllerModifyVolume"],
    "Node": ["NodeStageVolume", "NodeUnstageVolume", "NodePublishVolume", "NodeUnpublishVolume",
             "NodeGetVolumeStats", "NodeExpandVolume", "NodeGetCapabilities", "NodeGetInfo"],
    "GroupController": ["GroupControllerGetCapabilities", "CreateVolumeGroupSnapshot",
                        "DeleteVolumeGroupSnapshot", "GetVolumeGroupSnapshot"],
    "SnapshotMetadata": ["GetMetadataAllocated", "GetMetadataDelta"],
}


def test_committed_bindings_match_a_fresh_generation() -> None:
    stale = protogen.check()
    assert stale == [], ("the committed CSI bindings are stale; regenerate them with "
                         f"`python -m cistern.csi.protogen`: {stale}")


def test_check_command_reports_fresh_bindings(capsys: pytest.CaptureFixture[str]) -> None:
    assert protogen.main(["--check"]) == 0
    assert "up to date" in capsys.readouterr().out


def test_package_and_services_are_upstream() -> None:
    file = csi_pb2.DESCRIPTOR
    assert file.package == "csi.v1"
    assert {name: [m.name for m in file.services_by_name[name].methods]
            for name in UPSTREAM_SERVICES} == UPSTREAM_SERVICES
    node = file.services_by_name["Node"].methods_by_name["NodePublishVolume"]
    assert node.full_name == "csi.v1.Node.NodePublishVolume"
    assert node.input_type.full_name == "csi.v1.NodePublishVolumeRequest"


@pytest.mark.parametrize("message, field, number", UPSTREAM_FIELDS)
def test_field_numbers_are_upstream(message: str, field: str, number: int) -> None:
    descriptor = csi_pb2.DESCRIPTOR.message_types_by_name[message.split(".")[0]]
    for nested in message.split(".")[1:]:
        descriptor = descriptor.nested_types_by_name[nested]
    assert descriptor.fields_by_name[field].number == number


def test_enums_are_upstream() -> None:
    mode = csi_pb2.VolumeCapability.AccessMode
    assert (mode.SINGLE_NODE_WRITER, mode.SINGLE_NODE_READER_ONLY, mode.MULTI_NODE_READER_ONLY,
            mode.MULTI_NODE_SINGLE_WRITER, mode.MULTI_NODE_MULTI_WRITER,
            mode.SINGLE_NODE_SINGLE_WRITER, mode.SINGLE_NODE_MULTI_WRITER) == (1, 2, 3, 4, 5, 6, 7)
    svc = csi_pb2.PluginCapability.Service
    assert (svc.CONTROLLER_SERVICE, svc.VOLUME_ACCESSIBILITY_CONSTRAINTS,
            svc.GROUP_CONTROLLER_SERVICE) == (1, 2, 3)
    node = csi_pb2.NodeServiceCapability.RPC
    assert (node.STAGE_UNSTAGE_VOLUME, node.GET_VOLUME_STATS, node.EXPAND_VOLUME,
            node.VOLUME_CONDITION) == (1, 2, 3, 4)
    ctl = csi_pb2.ControllerServiceCapability.RPC
    assert (ctl.CREATE_DELETE_VOLUME, ctl.PUBLISH_READONLY, ctl.EXPAND_VOLUME,
            ctl.MODIFY_VOLUME, ctl.GET_SNAPSHOT) == (1, 8, 9, 14, 15)
    assert (csi_pb2.VolumeUsage.BYTES, csi_pb2.VolumeUsage.INODES) == (1, 2)


def test_every_secrets_field_is_marked_csi_secret() -> None:
    assert csi_pb2.csi_secret.number == 1059
    marked = []
    for message in csi_pb2.DESCRIPTOR.message_types_by_name.values():
        for field in message.fields:
            if field.name == "secrets":
                assert field.GetOptions().Extensions[csi_pb2.csi_secret], message.name
                marked.append(message.name)
            elif field.type == FieldDescriptor.TYPE_STRING:
                assert not field.GetOptions().Extensions[csi_pb2.csi_secret]
    assert "NodePublishVolumeRequest" in marked and len(marked) >= 15


def test_a_message_round_trips_in_upstream_wire_format() -> None:
    # Hand-encoded bytes of NodeUnpublishVolumeRequest{volume_id: "a/b", target_path: "/t"}:
    # field 1 (tag 0x0a) length 3, field 2 (tag 0x12) length 2.
    wire = b"\x0a\x03a/b\x12\x02/t"
    request = csi_pb2.NodeUnpublishVolumeRequest.FromString(wire)
    assert (request.volume_id, request.target_path) == ("a/b", "/t")
    assert request.SerializeToString() == wire

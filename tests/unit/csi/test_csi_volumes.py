"""Volume ids, contexts, capabilities and provisioning names: pure logic."""

from __future__ import annotations

import pytest

from cistern.csi.controller import volume_for
from cistern.csi.errors import InvalidArgument
from cistern.csi.proto import csi_pb2
from cistern.csi.volumes import (
    VolumeRef,
    capabilities_supported,
    check_capability,
    parse_volume_id,
    resolve_volume,
)

Mode = csi_pb2.VolumeCapability.AccessMode


def cap(mode: int = Mode.SINGLE_NODE_WRITER, fs_type: str = "",
        flags: tuple[str, ...] = ()) -> csi_pb2.VolumeCapability:
    return csi_pb2.VolumeCapability(
        mount=csi_pb2.VolumeCapability.MountVolume(fs_type=fs_type, mount_flags=list(flags)),
        access_mode=csi_pb2.VolumeCapability.AccessMode(mode=mode))


@pytest.mark.parametrize("volume_id, expected", [
    ("ckpt/run-1", VolumeRef("ckpt", "run-1")),
    ("ckpt/team/run-1/", VolumeRef("ckpt", "team/run-1")),
    ("ckpt//x", VolumeRef("ckpt", "x")),
    ("csi-1234abcd", None),
    ("ckpt/", None),
    ("Ckpt/x", None),
    ("", None),
])
def test_parse_volume_id(volume_id: str, expected: VolumeRef | None) -> None:
    assert parse_volume_id(volume_id) == expected


@pytest.mark.parametrize("volume_id", ["ckpt/../etc", "ckpt/a/../../b", "ckpt/./a",
                                       "ckpt/a//b", "ckpt/a\x00b"])
def test_escaping_ids_are_invalid(volume_id: str) -> None:
    with pytest.raises(InvalidArgument):
        parse_volume_id(volume_id)


def test_context_wins_over_the_id() -> None:
    ref = resolve_volume("csi-abc", {"writeCache": "ckpt", "path": "/jobs/a/",
                                     "csi.storage.k8s.io/ephemeral": "true"})
    assert ref == VolumeRef("ckpt", "jobs/a")
    assert ref.volume_id == "ckpt/jobs/a"
    assert resolve_volume("ckpt/x", {}) == VolumeRef("ckpt", "x")
    assert resolve_volume("csi-abc", {"other": "1"}) is None
    with pytest.raises(InvalidArgument, match="go together"):
        resolve_volume("csi-abc", {"path": "x"})
    with pytest.raises(InvalidArgument, match="'..'"):
        resolve_volume("csi-abc", {"writeCache": "ckpt", "path": "../x"})


def test_capabilities() -> None:
    for mode in (Mode.SINGLE_NODE_WRITER, Mode.MULTI_NODE_MULTI_WRITER,
                 Mode.MULTI_NODE_READER_ONLY, Mode.SINGLE_NODE_MULTI_WRITER):
        check_capability(cap(mode))
    check_capability(cap(fs_type="fuse.cistern", flags=("ro", "noexec")))
    block = csi_pb2.VolumeCapability(block=csi_pb2.VolumeCapability.BlockVolume(),
                                     access_mode=csi_pb2.VolumeCapability.AccessMode(mode=1))
    for bad, reason in ((block, "block"), (cap(Mode.UNKNOWN), "access_mode"),
                        (cap(fs_type="xfs"), "fs_type"),
                        (csi_pb2.VolumeCapability(), "access_type"),
                        (cap(flags=("password=hunter2",)), "mount flag")):
        with pytest.raises(InvalidArgument, match=reason) as info:
            check_capability(bad)
        assert "hunter2" not in info.value.message
    assert capabilities_supported([cap(), cap(Mode.MULTI_NODE_MULTI_WRITER)]) is None
    assert "block" in (capabilities_supported([cap(), block]) or "")


def test_provisioned_volume_names() -> None:
    meta = {"writeCache": "ckpt", "csi.storage.k8s.io/pvc/name": "llama",
            "csi.storage.k8s.io/pvc/namespace": "ml",
            "csi.storage.k8s.io/pv/name": "pvc-0123abcd-aaaa-bbbb-cccc-dddddddddddd"}
    name = "pvc-0123abcd-aaaa-bbbb-cccc-dddddddddddd"
    assert volume_for(name, meta) == VolumeRef("ckpt", "ml/llama-0123abcd")
    assert volume_for(name, meta) == volume_for(name, dict(meta))  # deterministic
    # A recreated PVC of the same name gets a new directory (new PV name, new suffix).
    assert volume_for("pvc-99999999-0000", meta).dir == "ml/llama-99999999"
    other = volume_for("my-volume", meta)
    assert other.dir.startswith("ml/llama-") and len(other.dir) == len("ml/llama-") + 8
    assert volume_for(name, {"writeCache": "ckpt"}) == VolumeRef("ckpt", name)
    # Too long for a 128-byte volume id with the PVC name: fall back to the CO's name.
    long = {**meta, "csi.storage.k8s.io/pvc/name": "x" * 200}
    assert volume_for(name, long) == VolumeRef("ckpt", name)
    with pytest.raises(InvalidArgument, match="writeCache"):
        volume_for(name, {})
    with pytest.raises(InvalidArgument, match="unknown StorageClass parameter"):
        volume_for(name, {"writeCache": "ckpt", "bucket": "b"})

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
    validate_dir,
)
from cistern.writecache import cache_key

Mode = csi_pb2.VolumeCapability.AccessMode


def cap(mode: int = Mode.SINGLE_NODE_WRITER, fs_type: str = "",
        flags: tuple[str, ...] = ()) -> csi_pb2.VolumeCapability:
    return csi_pb2.VolumeCapability(
        mount=csi_pb2.VolumeCapability.MountVolume(fs_type=fs_type, mount_flags=list(flags)),
        access_mode=csi_pb2.VolumeCapability.AccessMode(mode=mode))


@pytest.mark.parametrize("volume_id, expected", [
    ("ckpt/run-1", VolumeRef("ckpt", "run-1")),
    ("ckpt/team/run-1", VolumeRef("ckpt", "team/run-1")),
    ("ml.ckpt/team/run-1", VolumeRef("ml.ckpt", "team/run-1")),
    ("csi-1234abcd", None),
    ("ckpt/", None),
    ("Ckpt/x", None),
    ("", None),
])
def test_parse_volume_id(volume_id: str, expected: VolumeRef | None) -> None:
    assert parse_volume_id(volume_id) == expected


@pytest.mark.parametrize("volume_id", ["ckpt/../etc", "ckpt/a/../../b", "ckpt/./a",
                                       "ckpt/a//b", "ckpt/a\x00b",
                                       # issue 13: one directory, one id (no aliases)
                                       "ckpt//x", "ckpt/x/", "ckpt/team/run-1/", "ckpt///x"])
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
    # The cache lives in the PVC's namespace unless the StorageClass names another.
    ref, context = volume_for(name, meta)
    assert ref == VolumeRef("ml.ckpt", "ml/llama-0123abcd")
    assert context == {"writeCache": "ckpt", "writeCacheNamespace": "ml",
                       "path": "ml/llama-0123abcd"}
    assert resolve_volume(ref.volume_id, context) == ref  # what NodePublish sees again
    shared = volume_for(name, {**meta, "writeCacheNamespace": "platform"})[0]
    assert shared == VolumeRef("platform.ckpt", "ml/llama-0123abcd")
    assert volume_for(name, meta) == volume_for(name, dict(meta))  # deterministic
    # A recreated PVC of the same name gets a new directory (new PV name, new suffix).
    assert volume_for("pvc-99999999-0000", meta)[0].dir == "ml/llama-99999999"
    other = volume_for("my-volume", meta)[0]
    assert other.dir.startswith("ml/llama-") and len(other.dir) == len("ml/llama-") + 8
    assert volume_for(name, {"writeCache": "ckpt"})[0] == VolumeRef("ckpt", name)
    # Too long for a 128-byte volume id: a readable prefix and a hash, still unique.
    long = {**meta, "csi.storage.k8s.io/pvc/name": "x" * 200}
    bounded = volume_for(name, long)[0]
    assert len(bounded.volume_id.encode()) <= 128 and bounded.dir.startswith("ml/xxxx")
    assert bounded != volume_for("pvc-11111111-2222", long)[0]
    with pytest.raises(InvalidArgument, match="writeCache"):
        volume_for(name, {})
    with pytest.raises(InvalidArgument, match="unknown StorageClass parameter"):
        volume_for(name, {"writeCache": "ckpt", "bucket": "b"})


@pytest.mark.parametrize("name", ["n" * 128, "é" * 64, "🙂" * 32, "a/" * 64, "..", "."])
def test_a_128_byte_name_gets_a_bounded_unique_id(name: str) -> None:
    """The spec limits names and ids to 128 bytes; a 128-byte name must still work."""
    assert len(name.encode()) <= 128
    long_cache = {"writeCache": "c" * 63, "writeCacheNamespace": "n" * 63}
    for parameters in ({"writeCache": "ckpt"}, long_cache):
        ref = volume_for(name, parameters)[0]
        assert len(ref.volume_id.encode()) <= 128
        assert parse_volume_id(ref.volume_id) == ref
        assert ref != volume_for(name + "x" if len(name.encode()) < 128 else name[:-1],
                                 parameters)[0]


def test_lengths_are_counted_in_bytes() -> None:
    with pytest.raises(InvalidArgument, match="255 bytes"):
        validate_dir("é" * 200)  # 200 characters, 400 bytes
    with pytest.raises(InvalidArgument, match="1024 bytes"):
        validate_dir("/".join(["é" * 100] * 6))


def test_cache_keys_do_not_collide_across_namespaces() -> None:
    assert cache_key("team-a", "ckpt") != cache_key("team-b", "ckpt")
    assert cache_key("a", "b-c") != cache_key("a-b", "c")
    long_a, long_b = cache_key("n" * 63, "c" * 63), cache_key("n" * 63, "c" * 62 + "d")
    assert long_a != long_b and len(long_a) == len(long_b) == 63 and "_" in long_a
    assert cache_key("", "ckpt") == "ckpt"


def test_inline_volumes_use_the_pod_namespace() -> None:
    inline = {"writeCache": "ckpt", "path": "x", "csi.storage.k8s.io/ephemeral": "true",
              "csi.storage.k8s.io/pod.namespace": "team-b"}
    assert resolve_volume("csi-1", inline) == VolumeRef("team-b.ckpt", "x")
    shared = {**inline, "writeCacheNamespace": "team-a"}
    assert resolve_volume("csi-1", shared) == VolumeRef("team-a.ckpt", "x")
    with pytest.raises(InvalidArgument, match="namespace"):
        resolve_volume("csi-1", {**inline, "writeCacheNamespace": "Team_A"})

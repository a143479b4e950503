"""Mount table parsing, secret redaction, per-target locks and settings."""

from __future__ import annotations

import threading

import grpc
import pytest

from cistern.csi.errors import Aborted, CSIError, NotFound, grpc_boundary
from cistern.csi.interceptor import redact
from cistern.csi.locks import OperationLocks
from cistern.csi.mounts import parse_mountinfo
from cistern.csi.proto import csi_pb2
from cistern.csi.settings import DriverSettings, socket_path

MOUNTINFO = """\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
44 22 0:41 / /var/lib/cistern/mounts/ckpt rw,nosuid,nodev,relatime shared:5 - fuse.cistern \
cistern:s3://bucket rw,user_id=0,group_id=0,default_permissions,allow_other
51 22 0:41 /team/run\\0401 /var/lib/kubelet/pods/p/volumes/my\\040vol ro,relatime - fuse.cistern \
cistern:s3://bucket rw
52 22 0:50 / /var/lib/kubelet/pods/p/volumes/my\\040vol rw - tmpfs tmpfs rw
"""


def test_mountinfo_parsing() -> None:
    table = parse_mountinfo(MOUNTINFO)
    cache = table.at("/var/lib/cistern/mounts/ckpt/")
    assert cache is not None
    assert (cache.fstype, cache.device, cache.root) == ("fuse.cistern", "0:41", "/")
    assert not cache.read_only
    # Octal escapes are decoded; the last mount at a point is the visible one.
    top = table.at("/var/lib/kubelet/pods/p/volumes/my vol")
    assert top is not None and top.fstype == "tmpfs"
    bind = [e for e in table.entries if e.mount_id == 51][0]
    assert bind.root == "/team/run 1" and bind.read_only
    assert table.at("/nowhere") is None and not table.is_mount_point("/var/lib")


def test_redaction_hides_secrets_and_mount_flags_without_touching_the_original() -> None:
    request = csi_pb2.NodePublishVolumeRequest(
        volume_id="ckpt/x", target_path="/t", secrets={"key": "hunter2"},
        volume_capability=csi_pb2.VolumeCapability(
            mount=csi_pb2.VolumeCapability.MountVolume(mount_flags=["password=hunter3"])),
        volume_context={"writeCache": "ckpt"})
    clean = redact(request)
    text = str(clean)
    assert "hunter2" not in text and "hunter3" not in text
    assert clean.secrets["key"] == "***"
    assert list(clean.volume_capability.mount.mount_flags) == ["***"]
    assert clean.volume_context["writeCache"] == "ckpt" and clean.volume_id == "ckpt/x"
    assert request.secrets["key"] == "hunter2"  # the request itself is untouched


def test_one_operation_per_key() -> None:
    locks = OperationLocks()
    entered, release = threading.Event(), threading.Event()

    def hold() -> None:
        with locks.hold("/target"):
            entered.set()
            release.wait(5)

    thread = threading.Thread(target=hold)
    thread.start()
    assert entered.wait(5)
    with pytest.raises(Aborted, match="in progress"), locks.hold("/target"):
        pass
    with locks.hold("/other"):
        pass
    release.set()
    thread.join()
    with pytest.raises(RuntimeError), locks.hold("/target"):
        raise RuntimeError("boom")
    with locks.hold("/target"):  # released after the exception
        pass


class _Context:
    def __init__(self) -> None:
        self.aborted: tuple[grpc.StatusCode, str] | None = None

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.aborted = (code, details)
        raise grpc.RpcError(details)


class _Servicer:
    @grpc_boundary
    def Missing(self, request: object, context: object) -> None:
        raise NotFound("volume x does not exist")

    @grpc_boundary
    def Buggy(self, request: object, context: object) -> None:
        raise KeyError("oops")


def test_the_error_boundary_maps_domain_errors_and_hides_nothing_else() -> None:
    context = _Context()
    with pytest.raises(grpc.RpcError):
        _Servicer().Missing(None, context)
    assert context.aborted == (grpc.StatusCode.NOT_FOUND, "volume x does not exist")
    with pytest.raises(grpc.RpcError):
        _Servicer().Buggy(None, context)
    assert context.aborted is not None and context.aborted[0] == grpc.StatusCode.INTERNAL
    assert issubclass(NotFound, CSIError) and NotFound.code == grpc.StatusCode.NOT_FOUND


def test_settings() -> None:
    assert socket_path("unix:///csi/csi.sock") == "/csi/csi.sock"
    assert socket_path("unix:/csi/csi.sock") == "/csi/csi.sock"
    assert socket_path("/csi/csi.sock") == "/csi/csi.sock"
    with pytest.raises(ValueError):
        socket_path("tcp://127.0.0.1:10000")
    with pytest.raises(ValueError, match="node id"):
        DriverSettings(endpoint="unix:///x.sock", node_id="", mode="node")
    with pytest.raises(ValueError, match="mode"):
        DriverSettings(endpoint="unix:///x.sock", node_id="n", mode="both")
    controller = DriverSettings(endpoint="unix:///x.sock", node_id="", mode="controller")
    assert controller.runs_controller and not controller.runs_node

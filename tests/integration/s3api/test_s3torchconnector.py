"""s3torchconnector (AWS CRT / mountpoint-s3-client) checkpoints through the node's endpoint:
the objects land in the real bucket under the same keys."""

from __future__ import annotations

from typing import Any

import pytest

from support.s3server import read_object

torch = pytest.importorskip("torch")
s3tc = pytest.importorskip("s3torchconnector")


def _state_dict() -> dict[str, Any]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(),
                                torch.nn.Linear(512, 64))
    return {"model": model.state_dict(), "step": 7,
            "big": torch.randn(3 * 2**20 // 4 * 5)}  # ~15 MiB: a multipart upload


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if a.keys() != b.keys():
        return False
    for key, value in a.items():
        if isinstance(value, dict):
            if not _same(value, b[key]):
                return False
        elif isinstance(value, torch.Tensor):
            if not torch.equal(value, b[key]):
                return False
        elif value != b[key]:
            return False
    return True


def test_s3checkpoint_save_and_load(s3node: Any, s3: Any, monkeypatch: pytest.MonkeyPatch
                                    ) -> None:
    from s3torchconnector import S3Checkpoint, S3ClientConfig

    for name, value in s3node.env().items():
        monkeypatch.setenv(name, value)
    checkpoint = S3Checkpoint(region="us-east-1", endpoint=s3node.endpoint,
                              s3client_config=S3ClientConfig(force_path_style=True,
                                                             max_attempts=2))
    state = _state_dict()
    uri = f"s3://{s3node.bucket}/jobs/run-1/step-7/model.pt"
    with checkpoint.writer(uri) as writer:
        torch.save(state, writer)
    with checkpoint.reader(uri) as reader:
        loaded = torch.load(reader, weights_only=True)
    assert _same(state, loaded)
    # The same file through the mount, and, once flushed, in the bucket.
    local = (s3node.node.mount / "jobs/run-1/step-7/model.pt").read_bytes()
    s3node.node.flush()
    assert read_object(s3, s3node.bucket, "jobs/run-1/step-7/model.pt") == local


def test_s3checkpoint_with_a_wrong_secret_is_refused(s3node: Any,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from s3torchconnector import S3Checkpoint, S3ClientConfig
    from s3torchconnectorclient import S3Exception

    for name, value in s3node.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    checkpoint = S3Checkpoint(region="us-east-1", endpoint=s3node.endpoint,
                              s3client_config=S3ClientConfig(force_path_style=True,
                                                             max_attempts=1))
    with pytest.raises((S3Exception, OSError)) as refused, \
            checkpoint.writer(f"s3://{s3node.bucket}/denied.pt") as writer:
        torch.save({"x": torch.zeros(4)}, writer)
    assert "403" in str(refused.value) or "Signature" in str(refused.value) \
        or "Forbidden" in str(refused.value)
    assert not (s3node.node.mount / "denied.pt").exists()


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
def test_dcp_save_and_load_through_the_endpoint(s3node: Any, s3: Any,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    dcp_mod = pytest.importorskip("s3torchconnector.dcp")
    import torch.distributed.checkpoint as dcp
    from s3torchconnector import S3ClientConfig

    for name, value in s3node.env().items():
        monkeypatch.setenv(name, value)
    config = S3ClientConfig(force_path_style=True, max_attempts=2)
    path = f"s3://{s3node.bucket}/dcp/step-3"
    state = {"w": torch.arange(2**20, dtype=torch.float32), "b": torch.ones(17)}
    dcp.save(state, storage_writer=dcp_mod.S3StorageWriter("us-east-1", path,
                                                           s3client_config=config))
    loaded = {"w": torch.zeros(2**20), "b": torch.zeros(17)}
    dcp.load(loaded, storage_reader=dcp_mod.S3StorageReader("us-east-1", path,
                                                           s3client_config=config))
    assert torch.equal(loaded["w"], state["w"]) and torch.equal(loaded["b"], state["b"])
    names = sorted(p.name for p in (s3node.node.mount / "dcp/step-3").iterdir())
    assert ".metadata" in names and any(n.endswith(".distcp") for n in names)
    s3node.node.flush()
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=s3node.bucket,
                                                       Prefix="dcp/step-3/")["Contents"])
    assert keys == [f"dcp/step-3/{n}" for n in names]

"""Real clients: PyTorch torch.save and torch.distributed.checkpoint writing into the mount."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from support.frontends import ON_ALL_FRONTENDS
from support.s3server import list_keys, read_object

pytestmark = ON_ALL_FRONTENDS

torch = pytest.importorskip("torch", reason="PyTorch is not installed (pip install torch==2.13.0)")


def _model() -> Any:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(),
                                torch.nn.Linear(512, 64))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss = model(torch.randn(8, 256)).sum()
    loss.backward()
    optimizer.step()
    return model, optimizer


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_torch_save_temp_then_rename(make_node: Any, bucket: str, s3: Any, proxy: Any) -> None:
    node = make_node(bucket, endpoint=proxy.endpoint, upload_delay=1.0)
    model, optimizer = _model()
    final = node.mount / "checkpoint.pt"
    tmp = node.mount / "checkpoint.pt.tmp"
    torch.save({"model": model.state_dict(), "optim": optimizer.state_dict()}, tmp)
    os.replace(tmp, final)
    loaded = torch.load(final, weights_only=True)
    assert _same(loaded["model"], model.state_dict())
    node.flush()
    assert list(list_keys(s3, bucket)) == ["checkpoint.pt"]
    assert read_object(s3, bucket, "checkpoint.pt") == final.read_bytes()
    assert proxy.counts().get("COPY", 0) == 0 and proxy.counts().get("DELETE", 0) == 0


def test_distributed_checkpoint_save_load(make_node: Any, bucket: str, s3: Any) -> None:
    import torch.distributed.checkpoint as dcp

    node = make_node(bucket, upload_delay=0.5)
    model, optimizer = _model()
    state = {"model": model.state_dict(), "optim": optimizer.state_dict()}
    path = node.mount / "ckpt" / "step-100"
    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(path), thread_count=2))
    names = sorted(os.listdir(path))
    assert ".metadata" in names and any(n.endswith(".distcp") for n in names)

    fresh_model, fresh_optim = _model()
    for p in fresh_model.parameters():
        p.data.zero_()
    target = {"model": fresh_model.state_dict(), "optim": fresh_optim.state_dict()}
    dcp.load(target, storage_reader=dcp.FileSystemReader(str(path)))
    assert _same(target["model"], model.state_dict())

    node.flush()
    local = _files(node.mount)
    assert set(list_keys(s3, bucket)) == set(local)
    for key, body in local.items():
        assert read_object(s3, bucket, key) == body, key


def test_checkpoint_readable_from_a_fresh_node(make_node: Any, bucket: str) -> None:
    import torch.distributed.checkpoint as dcp

    writer = make_node(bucket, upload_delay=0.0)
    model, _ = _model()
    dcp.save({"model": model.state_dict()},
             storage_writer=dcp.FileSystemWriter(str(writer.mount / "run" / "step-1")))
    writer.flush()
    writer.stop()
    reader = make_node(bucket, name="reader")
    fresh, _ = _model()
    for p in fresh.parameters():
        p.data.zero_()
    target = {"model": fresh.state_dict()}
    dcp.load(target, storage_reader=dcp.FileSystemReader(str(reader.mount / "run" / "step-1")))
    assert _same(target["model"], model.state_dict())

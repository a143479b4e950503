"""The node status type: what /status serialises and every reader parses back."""

from __future__ import annotations

import json
from typing import Any

import pytest

from cistern.nodestatus import (
    CheckpointProgress,
    DrainProgress,
    FuseStatus,
    NodeStatus,
    NodeStatusError,
    StoreErrorReport,
)

FULL = NodeStatus(
    state="draining", frontend="passthrough",
    fuse=FuseStatus(frontend="passthrough", passthrough=True, kernel_protocol="7.41",
                    requests=10, errors=0, passthrough_opens=3, direct_io_opens=1,
                    open_backing_files=2, held=True, takeovers=2,
                    last_takeover_pause_seconds=0.75, resent_requests=1,
                    reason="auto: the kernel offers FUSE passthrough", writeback_cache=False),
    mount="/mnt/c", store="s3://b/p", dirty_bytes=5, dirty_files=1, uploading_files=1,
    open_writers=1, pending_moves=2, pending_deletes=3, clean_bytes=7,
    uploaded_bytes_total=100, uploaded_objects_total=4, last_flush_time=1767225600.5,
    errors=1, recent_errors=(StoreErrorReport(1.0, "PUT a", "SlowDown", "SlowDown"),),
    throttled=True, upload_rate_limit_requests=50.0, capacity_bytes=2**30,
    mode="writeThrough",
    checkpoints=(CheckpointProgress("run/step-1", "committed-locally", 3, 30, 1),),
    uptime_seconds=12.5,
    drain=DrainProgress(1.5, 5, 1, None, 3600.0, False, "hold"), flushed=False)


def test_a_status_survives_json() -> None:
    wire = json.loads(json.dumps(FULL.to_json()))
    assert NodeStatus.from_json(wire) == FULL


def test_the_wire_keys_are_the_documented_ones() -> None:
    wire = FULL.to_json()
    for key in ("state", "dirty_bytes", "dirty_files", "uploading_files", "clean_bytes",
                "uploaded_bytes_total", "uploaded_objects_total", "errors", "recent_errors",
                "capacity_bytes", "checkpoints", "drain", "frontend", "fuse"):
        assert key in wire, key
    assert set(wire["fuse"]) == {"frontend", "passthrough", "kernelProtocol", "requests",
                                 "errors", "passthroughOpens", "directIoOpens",
                                 "openBackingFiles", "held", "takeovers",
                                 "lastTakeoverPauseSeconds", "resentRequests", "reason",
                                 "writebackCache"}
    assert "flushed" not in NodeStatus(state="running").to_json()
    assert "drain" not in NodeStatus(state="running").to_json()


def test_a_starting_daemon_reports_only_its_state() -> None:
    status = NodeStatus.from_json({"state": "starting"})
    assert status == NodeStatus(state="starting")
    assert not status.draining and status.last_error is None


def test_unknown_keys_from_a_newer_daemon_are_ignored() -> None:
    assert NodeStatus.from_json({"state": "running", "dirty_bytes": 3, "shiny": [1]}) == \
        NodeStatus(state="running", dirty_bytes=3)


@pytest.mark.parametrize(("data", "message"), [
    ([], "expected a JSON object"),
    ({}, "status.state: expected one of"),
    ({"state": "sleeping"}, "status.state"),
    ({"state": "running", "dirty_bytes": "5"}, "status.dirty_bytes: expected int"),
    ({"state": "running", "dirty_bytes": True}, "status.dirty_bytes"),
    ({"state": "running", "errors": ["SlowDown"]}, "status.errors: expected int"),
    ({"state": "running", "recent_errors": ["SlowDown"]}, "recent_errors"),
    ({"state": "running", "drain": {"bytes_left": -0.5}}, "drain.bytes_left"),
    ({"state": "running", "fuse": {"requests": "many"}}, "fuse.requests"),
    ({"state": "running", "checkpoints": [{"path": "x", "state": "half"}]}, "checkpoints"),
])
def test_a_malformed_answer_is_refused_with_the_key(data: Any, message: str) -> None:
    with pytest.raises(NodeStatusError, match=message):
        NodeStatus.from_json(data)


def test_derived_values() -> None:
    assert FULL.draining and FULL.cached_bytes == 12
    assert FULL.last_error == "PUT a: SlowDown"
    assert NodeStatus(state="drained").draining
    assert not NodeStatus(state="running").draining

"""The cache node's status: the one type behind ``GET /status``.

The daemon builds a ``NodeStatus`` from what its core, flusher and front end report and
serialises it once (``to_json``); the CLI (``cistern-node status``), the metrics collector and
the operator parse the JSON back with ``NodeStatus.from_json`` and read typed attributes. The
JSON keys are the daemon's historical ones (snake_case; the ``fuse`` object camelCase), listed
in docs/configuration.md.

``from_json`` tolerates keys it does not know (a newer daemon) and missing optional ones (an
older daemon, or a daemon still starting, which reports only ``state``); a value of the wrong
type is a ``NodeStatusError``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, get_args

__all__ = [
    "CheckpointProgress",
    "DrainProgress",
    "FuseStatus",
    "NodeState",
    "NodeStatus",
    "NodeStatusError",
    "PeersStatus",
    "S3EndpointStatus",
    "StoreErrorReport",
]

NodeState = Literal["starting", "running", "draining", "drained", "stopping"]
CheckpointState = Literal["writing", "committed-locally", "durable"]
#: States in which the node evacuates dirty data and holds or refuses new writes.
DRAINING_STATES: frozenset[str] = frozenset({"draining", "drained"})

T = TypeVar("T")


class NodeStatusError(ValueError):
    """A /status answer that is not a node status (wrong types, not an object)."""


def _field(data: Mapping[str, Any], key: str, kind: type[T] | tuple[type, ...],
           default: Any, where: str) -> Any:
    value = data.get(key, default)
    if value is None and default is None:
        return None
    if isinstance(value, bool) and kind is not bool and not (
            isinstance(kind, tuple) and bool in kind):
        raise NodeStatusError(f"{where}.{key}: expected {_name(kind)}, got {value!r}")
    if kind is float and isinstance(value, int):
        return float(value)
    if not isinstance(value, kind):
        raise NodeStatusError(f"{where}.{key}: expected {_name(kind)}, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise NodeStatusError(f"{where}.{key}: not a finite number: {value!r}")
    return value


def _name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


def _literal(data: Mapping[str, Any], key: str, literal: Any, default: Any, where: str) -> Any:
    value = data.get(key, default)
    if value not in get_args(literal):
        raise NodeStatusError(f"{where}.{key}: expected one of "
                              f"{', '.join(get_args(literal))}, got {value!r}")
    return value


def _object(data: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(data, Mapping):
        raise NodeStatusError(f"{where}: expected a JSON object, got {type(data).__name__}")
    return data


@dataclass(frozen=True)
class StoreErrorReport:
    """One recent object-store error (the flusher keeps the last 20)."""

    time: float
    """Unix time of the error."""
    op: str
    """What was being done: ``PUT key``, ``DELETE key``, ..."""
    error: str
    """The message (at most 300 characters)."""
    code: str = ""
    """S3 error code or exception class (``SlowDown``, ``TemporaryStoreError``)."""

    @classmethod
    def from_json(cls, data: Any, where: str = "recent_errors[]") -> StoreErrorReport:
        data = _object(data, where)
        return cls(time=_field(data, "time", float, 0.0, where),
                   op=str(_field(data, "op", str, "", where)),
                   error=str(_field(data, "error", str, "", where)),
                   code=str(data.get("code") or ""))

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        return f"{self.op}: {self.error}" if self.op else self.error


@dataclass(frozen=True)
class CheckpointProgress:
    """A recent checkpoint directory and how far it has got."""

    path: str
    state: CheckpointState
    files: int = 0
    bytes: int = 0
    pending_files: int = 0
    bytes_written: int = 0
    """Bytes in its files now (an open file's data file may be ahead of ``bytes``)."""
    bytes_uploaded: int = 0
    """Bytes the store holds in their current form, parts of streamed files included."""
    durable_at: float | None = None
    """Wall time (Unix seconds) its last byte became durable, once ``state`` is durable
    (uploads by this node process; None after a restart for files uploaded before it)."""

    @classmethod
    def from_json(cls, data: Any, where: str = "checkpoints[]") -> CheckpointProgress:
        data = _object(data, where)
        return cls(path=_field(data, "path", str, "", where),
                   state=_literal(data, "state", CheckpointState, None, where),
                   files=_field(data, "files", int, 0, where),
                   bytes=_field(data, "bytes", int, 0, where),
                   pending_files=_field(data, "pending_files", int, 0, where),
                   bytes_written=_field(data, "bytes_written", int, 0, where),
                   bytes_uploaded=_field(data, "bytes_uploaded", int, 0, where),
                   durable_at=_field(data, "durable_at", float, None, where))

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class DrainProgress:
    """Present while a drain runs (or has run) on the node."""

    started_seconds_ago: float
    bytes_left: int
    files_left: int
    eta_seconds: float | None
    """None until something has been evacuated."""
    timeout_seconds: float
    timed_out: bool
    new_writes: str
    """``hold`` or ``reject`` (drain.newWrites)."""

    @classmethod
    def from_json(cls, data: Any, where: str = "drain") -> DrainProgress:
        data = _object(data, where)
        return cls(started_seconds_ago=_field(data, "started_seconds_ago", float, 0.0, where),
                   bytes_left=_field(data, "bytes_left", int, 0, where),
                   files_left=_field(data, "files_left", int, 0, where),
                   eta_seconds=_field(data, "eta_seconds", float, None, where),
                   timeout_seconds=_field(data, "timeout_seconds", float, 0.0, where),
                   timed_out=_field(data, "timed_out", bool, False, where),
                   new_writes=_field(data, "new_writes", str, "hold", where))

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class S3EndpointStatus:
    """The node's S3 endpoint (present only when it is configured)."""

    url: str | None = None
    """``http://HOST:PORT`` to put in AWS_ENDPOINT_URL; None: unix socket only."""
    socket: str | None = None
    bucket: str = ""
    requests: int = 0
    errors: int = 0
    """Requests answered with an S3 error since start."""

    @classmethod
    def from_json(cls, data: Any, where: str = "s3_endpoint") -> S3EndpointStatus:
        data = _object(data, where)
        return cls(url=_field(data, "url", str, None, where),
                   socket=_field(data, "socket", str, None, where),
                   bucket=_field(data, "bucket", str, "", where),
                   requests=_field(data, "requests", int, 0, where),
                   errors=_field(data, "errors", int, 0, where))

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class PeersStatus:
    """The node's peer network (issue 17; present only when ``peers.listen`` is set)."""

    node: str = ""
    port: int = 0
    transport: str = "tcp"
    transport_reason: str = ""
    """Why this transport (e.g. why not RDMA)."""
    members: tuple[str, ...] = ()
    suspects: tuple[str, ...] = ()
    """Members skipped now: they missed a deadline."""
    bytes_held_for_peers: int = 0
    copies_held_for_peers: int = 0
    files_with_copies: int = 0
    """Dirty files of this node that have copies on peers."""
    copies_sent_total: int = 0
    copies_missing_total: int = 0
    """fsyncs that got fewer peer copies than their durability level asks."""
    last_copies_missing: str | None = None
    failed_fsyncs_total: int = 0
    peer_files_known: int = 0
    peer_read_bytes_total: int = 0
    rescued_uploads_total: int = 0
    rescue_races_lost_total: int = 0
    copies_conflicting: int = 0
    dead_peers: tuple[str, ...] = ()
    refused_connections_total: int = 0

    @classmethod
    def from_json(cls, data: Any, where: str = "peers") -> PeersStatus:
        data = _object(data, where)
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            default = f.default
            if isinstance(default, tuple):
                values[f.name] = tuple(_field(data, f.name, list, [], where))
            elif f.name == "last_copies_missing":
                values[f.name] = _field(data, f.name, str, None, where)
            else:
                values[f.name] = _field(data, f.name, type(default), default, where)
        return cls(**values)

    def to_json(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}


_FUSE_KEYS = {"kernel_protocol": "kernelProtocol", "passthrough_opens": "passthroughOpens",
              "direct_io_opens": "directIoOpens", "open_backing_files": "openBackingFiles",
              "last_takeover_pause_seconds": "lastTakeoverPauseSeconds",
              "resent_requests": "resentRequests", "writeback_cache": "writebackCache"}


@dataclass(frozen=True)
class FuseStatus:
    """The FUSE front end in use and its counters (None: the front end does not count it)."""

    frontend: str | None = None
    passthrough: bool = False
    """Whether the kernel passes reads and writes straight to the cache files."""
    kernel_protocol: str | None = None
    requests: int | None = None
    errors: int | None = None
    """Requests answered EIO."""
    passthrough_opens: int | None = None
    direct_io_opens: int | None = None
    open_backing_files: int | None = None
    held: bool = False
    """A FUSE holder keeps this connection: it survives the daemon (docs/restarts.md)."""
    takeovers: int | None = None
    """Daemons that took this connection over from a dead one since it was mounted."""
    last_takeover_pause_seconds: float | None = None
    """Seconds the mount went without a daemon before this one served it (None: mounted
    by this daemon)."""
    resent_requests: int | None = None
    """Requests the kernel sent again after the takeover (FUSE_NOTIFY_RESEND)."""
    reason: str | None = None
    """Why this front end runs (asked for, or what ``auto`` found on this kernel)."""
    writeback_cache: bool | None = None
    """The kernel's write-back cache is on (the splice front end)."""

    @classmethod
    def from_json(cls, data: Any, where: str = "fuse") -> FuseStatus:
        data = _object(data, where)
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            key = _FUSE_KEYS.get(f.name, f.name)
            kind: Any = {"frontend": str, "kernel_protocol": str, "passthrough": bool,
                         "held": bool, "last_takeover_pause_seconds": float, "reason": str,
                         "writeback_cache": bool}.get(f.name, int)
            values[f.name] = _field(data, key, kind, f.default, where)
        return cls(**values)

    def to_json(self) -> dict[str, Any]:
        return {_FUSE_KEYS.get(k, k): v for k, v in dataclasses.asdict(self).items()
                if v is not None}


@dataclass(frozen=True)
class NodeStatus:
    """What ``GET /status`` answers (and ``POST /drain``, ``/resume``, ``/flush``)."""

    state: NodeState
    frontend: str | None = None
    fuse: FuseStatus = field(default_factory=FuseStatus)
    mount: str = ""
    store: str = ""
    """The store URL (``s3://bucket/prefix``); never credentials."""
    dirty_bytes: int = 0
    dirty_files: int = 0
    uploading_files: int = 0
    open_writers: int = 0
    pending_moves: int = 0
    pending_deletes: int = 0
    clean_bytes: int = 0
    uploaded_bytes_total: int = 0
    uploaded_objects_total: int = 0
    conflicts_total: int = 0
    """Uploads refused because another writer had replaced the object (HTTP 412)."""
    last_conflict: str | None = None
    """``<key> -> <conflict key>`` of the latest: where this node's version was kept."""
    last_conflict_time: float | None = None
    """Unix time of the latest conflict (with ``last_conflict``: what an Event needs)."""
    last_flush_time: float | None = None
    """Unix time of the last completed upload; None: none yet."""
    errors: int = 0
    """Object-store errors since start."""
    recent_errors: tuple[StoreErrorReport, ...] = ()
    throttled: bool = False
    """The store throttles now (the adaptive request rate is cut)."""
    upload_rate_limit_requests: float = 0.0
    """Current adaptive request-rate limit (0: unlimited)."""
    capacity_bytes: int = 0
    mode: str = "writeBack"
    checkpoints: tuple[CheckpointProgress, ...] = ()
    uptime_seconds: float = 0.0
    drain: DrainProgress | None = None
    s3_endpoint: S3EndpointStatus | None = None
    """The S3 endpoint over the same namespace, when configured."""
    peers: PeersStatus | None = None
    """The peer network, when configured (issue 17)."""
    flushed: bool | None = None
    """Only in the answer to ``POST /flush``: whether everything reached the store in time."""

    @property
    def draining(self) -> bool:
        return self.state in DRAINING_STATES

    @property
    def cached_bytes(self) -> int:
        """Bytes held on the node's disk: dirty plus clean."""
        return self.dirty_bytes + self.clean_bytes

    @property
    def last_error(self) -> str | None:
        return self.recent_errors[-1].summary() if self.recent_errors else None

    @classmethod
    def from_json(cls, data: Any) -> NodeStatus:
        data = _object(data, "status")
        w = "status"
        fuse = data.get("fuse")
        drain = data.get("drain")
        recent = _field(data, "recent_errors", list, [], w)
        checkpoints = _field(data, "checkpoints", list, [], w)
        flushed = data.get("flushed")
        s3_endpoint = data.get("s3_endpoint")
        peers = data.get("peers")
        return cls(
            state=_literal(data, "state", NodeState, None, w),
            frontend=_field(data, "frontend", str, None, w),
            fuse=FuseStatus.from_json(fuse) if fuse else FuseStatus(),
            mount=_field(data, "mount", str, "", w),
            store=_field(data, "store", str, "", w),
            dirty_bytes=_field(data, "dirty_bytes", int, 0, w),
            dirty_files=_field(data, "dirty_files", int, 0, w),
            uploading_files=_field(data, "uploading_files", int, 0, w),
            open_writers=_field(data, "open_writers", int, 0, w),
            pending_moves=_field(data, "pending_moves", int, 0, w),
            pending_deletes=_field(data, "pending_deletes", int, 0, w),
            clean_bytes=_field(data, "clean_bytes", int, 0, w),
            uploaded_bytes_total=_field(data, "uploaded_bytes_total", int, 0, w),
            uploaded_objects_total=_field(data, "uploaded_objects_total", int, 0, w),
            conflicts_total=_field(data, "conflicts_total", int, 0, w),
            last_conflict=_field(data, "last_conflict", str, None, w),
            last_conflict_time=_field(data, "last_conflict_time", float, None, w),
            last_flush_time=_field(data, "last_flush_time", float, None, w),
            errors=_field(data, "errors", int, 0, w),
            recent_errors=tuple(StoreErrorReport.from_json(e) for e in recent),
            throttled=_field(data, "throttled", bool, False, w),
            upload_rate_limit_requests=_field(data, "upload_rate_limit_requests", float, 0.0, w),
            capacity_bytes=_field(data, "capacity_bytes", int, 0, w),
            mode=_field(data, "mode", str, "writeBack", w),
            checkpoints=tuple(CheckpointProgress.from_json(c) for c in checkpoints),
            uptime_seconds=_field(data, "uptime_seconds", float, 0.0, w),
            drain=None if drain is None else DrainProgress.from_json(drain),
            s3_endpoint=None if s3_endpoint is None else S3EndpointStatus.from_json(s3_endpoint),
            peers=None if peers is None else PeersStatus.from_json(peers),
            flushed=None if flushed is None else _field(data, "flushed", bool, None, w),
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "fuse":
                out["fuse"] = value.to_json()
            elif f.name in ("recent_errors", "checkpoints"):
                out[f.name] = [item.to_json() for item in value]
            elif f.name in ("drain", "s3_endpoint", "peers"):
                if value is not None:
                    out[f.name] = value.to_json()
            elif f.name == "flushed":
                if value is not None:
                    out["flushed"] = value
            else:
                out[f.name] = value
        return out

    def replace(self, **changes: Any) -> NodeStatus:
        return dataclasses.replace(self, **changes)

"""The node configuration: one schema shared by the node daemon, the operator and the CSI driver.

The operator renders a WriteCache spec into a ``NodeConfig`` and stores ``NodeConfig.to_dict()``
as YAML in a ConfigMap; the node daemon parses the same YAML with ``NodeConfig.from_dict()``.
Keys are camelCase, the same names the WriteCache CRD uses.

Sizes accept integers (bytes) or strings with a binary or decimal suffix ("16Mi", "1G").
Durations accept numbers (seconds) or strings ("500ms", "30s", "5m", "1h").
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

__all__ = [
    "DEFAULT_COMMIT_MARKERS",
    "DEFAULT_CONTROL",
    "CacheConfig",
    "ConfigError",
    "DrainPolicy",
    "FlushPolicy",
    "NodeConfig",
    "S3EndpointConfig",
    "StoreConfig",
    "load_node_config",
    "parse_duration",
    "parse_size",
]

DEFAULT_CONTROL = "127.0.0.1:9464"
#: Files frameworks write last: PyTorch DCP, Orbax, Megatron.
DEFAULT_COMMIT_MARKERS: tuple[str, ...] = (
    ".metadata",
    "commit_success.txt",
    "latest_checkpointed_iteration.txt",
)

_SIZE_UNITS = {
    "": 1,
    "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
    "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "": 1.0}


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the problem."""


def parse_size(value: Any, where: str = "size") -> int:
    """Parse a byte size: ``1048576``, ``"16Mi"``, ``"1G"``."""
    if isinstance(value, bool):
        raise ConfigError(f"{where}: expected a size, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"{where}: must not be negative, got {value}")
        return value
    if isinstance(value, float) and value.is_integer() and value >= 0:
        return int(value)
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", value)
        if match and match.group(2).lower() in _SIZE_UNITS:
            return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])
    raise ConfigError(f"{where}: expected a size like 1048576, '16Mi' or '1G', got {value!r}")


def parse_duration(value: Any, where: str = "duration") -> float:
    """Parse a duration in seconds: ``5``, ``0.5``, ``"500ms"``, ``"30s"``, ``"5m"``."""
    if isinstance(value, bool):
        raise ConfigError(f"{where}: expected a duration, got {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise ConfigError(f"{where}: must not be negative, got {value}")
        return float(value)
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|)\s*", value)
        if match:
            return float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    raise ConfigError(f"{where}: expected a duration like 5, '500ms', '30s' or '5m', got {value!r}")


def _fraction(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
        raise ConfigError(f"{where}: expected a fraction in (0, 1], got {value!r}")
    return float(value)


def _positive_int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where}: expected a positive integer, got {value!r}")
    return value


def _optional_rate(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, str):
        return float(parse_size(value, where))
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ConfigError(f"{where}: expected a positive number, got {value!r}")
    return float(value)


def _enum(value: Any, allowed: tuple[str, ...], where: str) -> str:
    if value not in allowed:
        raise ConfigError(f"{where}: expected one of {', '.join(allowed)}, got {value!r}")
    return str(value)


def _globs(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, list | tuple):
        raise ConfigError(f"{where}: expected a list of glob patterns, got {value!r}")
    for item in value:
        if not isinstance(item, str) or not item or "/" in item:
            raise ConfigError(f"{where}: each pattern must be a non-empty file name glob, "
                              f"got {item!r}")
    return tuple(value)


def _check_keys(data: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown setting(s) {', '.join(unknown)}; "
                          f"known: {', '.join(sorted(allowed))}")


def _section(data: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = data.get(key) or {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{key}: expected a mapping, got {value!r}")
    return value


@dataclass(frozen=True)
class StoreConfig:
    """Where the system of record lives."""

    url: str
    """``s3://bucket[/prefix]`` or ``file:///absolute/path`` (a local-directory object store)."""
    endpoint_url: str | None = None
    """S3 endpoint (MinIO, moto, a proxy); None for AWS."""
    region: str | None = None
    """S3 region; None lets boto3 decide."""
    path_style: bool = False
    """Use path-style addressing (needed by most S3-compatible servers)."""
    keep_last_checkpoints: int | None = None
    """Opt-in: delete older checkpoints from the store, keeping the newest N. Unset: never."""

    @property
    def scheme(self) -> str:
        return urlparse(self.url).scheme

    @property
    def bucket(self) -> str:
        return urlparse(self.url).netloc

    @property
    def prefix(self) -> str:
        """Key prefix, empty or ending in '/'."""
        parsed = urlparse(self.url)
        if parsed.scheme != "s3":
            return ""
        path = parsed.path.strip("/")
        return f"{path}/" if path else ""

    @property
    def local_path(self) -> Path:
        return Path(urlparse(self.url).path)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StoreConfig:
        _check_keys(data, {"url", "endpointUrl", "region", "pathStyle", "keepLastCheckpoints"},
                    "store")
        url = data.get("url")
        if not isinstance(url, str) or not url:
            raise ConfigError("store.url: required, e.g. s3://bucket/prefix or file:///srv/objects")
        parsed = urlparse(url)
        if parsed.scheme == "s3":
            if not re.fullmatch(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]", parsed.netloc):
                raise ConfigError(f"store.url: {parsed.netloc!r} is not a valid S3 bucket name")
            if ".." in parsed.path.split("/"):
                raise ConfigError("store.url: the prefix must not contain '..'")
        elif parsed.scheme == "file":
            if parsed.netloc or not parsed.path.startswith("/"):
                raise ConfigError("store.url: file URLs need an absolute path: file:///srv/objects")
        else:
            raise ConfigError(f"store.url: unsupported scheme {parsed.scheme!r}; use s3:// or file://")
        keep = data.get("keepLastCheckpoints")
        return cls(
            url=url,
            endpoint_url=data.get("endpointUrl") or None,
            region=data.get("region") or None,
            path_style=bool(data.get("pathStyle", False)),
            keep_last_checkpoints=None if keep is None else _positive_int(
                keep, "store.keepLastCheckpoints"),
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"url": self.url}
        if self.endpoint_url:
            out["endpointUrl"] = self.endpoint_url
        if self.region:
            out["region"] = self.region
        if self.path_style:
            out["pathStyle"] = True
        if self.keep_last_checkpoints is not None:
            out["keepLastCheckpoints"] = self.keep_last_checkpoints
        return out


@dataclass(frozen=True)
class FlushPolicy:
    """How and when dirty data goes to the object store."""

    mode: str = "writeBack"
    """``writeBack``: acknowledge on local fsync. ``writeThrough``: close/fsync wait for S3."""
    upload_delay: float = 1.0
    """Seconds a closed file rests before upload (lets temp files be renamed or deleted first)."""
    max_concurrent_uploads: int = 4
    """Files uploaded at once; multipart parts of one file share this budget."""
    part_size: int = 16 * 2**20
    """Multipart part size in bytes (S3 minimum 5 MiB)."""
    multipart_threshold: int = 32 * 2**20
    """Files at least this large use multipart upload."""
    max_bytes_per_second: float | None = None
    """Token-bucket limit on upload bandwidth for the whole node; None: unlimited."""
    max_requests_per_second: float | None = None
    """Token-bucket limit on S3 requests for the whole node; None: unlimited."""
    evacuation_bytes_per_second: float | None = None
    """Upload bandwidth during a drain; None: unlimited (ignores maxBytesPerSecond)."""
    commit_markers: tuple[str, ...] = DEFAULT_COMMIT_MARKERS
    """File-name globs uploaded only after every other file written before them in the same
    directory (or, for Megatron's tracker file, below its directory) is durable."""

    def is_commit_marker(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.commit_markers)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FlushPolicy:
        _check_keys(data, {"mode", "uploadDelay", "maxConcurrentUploads", "partSize",
                           "multipartThreshold", "maxBytesPerSecond", "maxRequestsPerSecond",
                           "evacuationBytesPerSecond", "commitMarkers"}, "flush")
        d = cls()
        part_size = parse_size(data.get("partSize", d.part_size), "flush.partSize")
        if not 5 * 2**20 <= part_size <= 5 * 2**30:
            raise ConfigError(f"flush.partSize: must be between 5Mi and 5Gi, got {part_size}")
        return cls(
            mode=_enum(data.get("mode", d.mode), ("writeBack", "writeThrough"), "flush.mode"),
            upload_delay=parse_duration(data.get("uploadDelay", d.upload_delay),
                                        "flush.uploadDelay"),
            max_concurrent_uploads=_positive_int(
                data.get("maxConcurrentUploads", d.max_concurrent_uploads),
                "flush.maxConcurrentUploads"),
            part_size=part_size,
            multipart_threshold=parse_size(data.get("multipartThreshold", d.multipart_threshold),
                                           "flush.multipartThreshold"),
            max_bytes_per_second=_optional_rate(data.get("maxBytesPerSecond"),
                                                "flush.maxBytesPerSecond"),
            max_requests_per_second=_optional_rate(data.get("maxRequestsPerSecond"),
                                                   "flush.maxRequestsPerSecond"),
            evacuation_bytes_per_second=_optional_rate(data.get("evacuationBytesPerSecond"),
                                                       "flush.evacuationBytesPerSecond"),
            commit_markers=_globs(data.get("commitMarkers", list(d.commit_markers)),
                                  "flush.commitMarkers"),
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "mode": self.mode,
            "uploadDelay": self.upload_delay,
            "maxConcurrentUploads": self.max_concurrent_uploads,
            "partSize": self.part_size,
            "multipartThreshold": self.multipart_threshold,
            "commitMarkers": list(self.commit_markers),
        }
        for key, value in (("maxBytesPerSecond", self.max_bytes_per_second),
                           ("maxRequestsPerSecond", self.max_requests_per_second),
                           ("evacuationBytesPerSecond", self.evacuation_bytes_per_second)):
            if value is not None:
                out[key] = value
        return out


@dataclass(frozen=True)
class CacheConfig:
    """The local NVMe cache."""

    dir: str = "/var/lib/cistern/cache"
    """Directory holding data files and the journal."""
    capacity_bytes: int | None = None
    """Bytes the cache may use; None: ``capacityPercent`` of the file system."""
    capacity_percent: float = 90.0
    """Share of the cache file system used when ``capacityBytes`` is unset."""
    high_watermark: float = 0.9
    """Above this share of capacity, clean data is evicted (LRU)."""
    low_watermark: float = 0.8
    """Eviction stops at this share of capacity."""
    admission_timeout: float = 30.0
    """Seconds a writer waits for space before the write or create fails (ENOSPC/EDQUOT)."""
    keep_last_checkpoints: int | None = None
    """Keep the newest N checkpoint directories cached locally; older clean ones are dropped."""
    checkpoint_pattern: str = "step-*"
    """Glob on directory names that identifies checkpoint directories."""
    cache_ttl: float | None = None
    """Clean data not read for this many seconds is dropped from the local cache."""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CacheConfig:
        _check_keys(data, {"dir", "capacityBytes", "capacityPercent", "highWatermark",
                           "lowWatermark", "admissionTimeout", "keepLastCheckpoints",
                           "checkpointPattern", "cacheTTL"}, "cache")
        d = cls()
        capacity = data.get("capacityBytes")
        percent = data.get("capacityPercent", d.capacity_percent)
        if isinstance(percent, bool) or not isinstance(percent, int | float) \
                or not 0 < percent <= 100:
            raise ConfigError(f"cache.capacityPercent: expected 1-100, got {percent!r}")
        high = _fraction(data.get("highWatermark", d.high_watermark), "cache.highWatermark")
        low = _fraction(data.get("lowWatermark", d.low_watermark), "cache.lowWatermark")
        if low >= high:
            raise ConfigError(f"cache.lowWatermark ({low}) must be below highWatermark ({high})")
        keep = data.get("keepLastCheckpoints")
        ttl = data.get("cacheTTL")
        pattern = data.get("checkpointPattern", d.checkpoint_pattern)
        if not isinstance(pattern, str) or not pattern or "/" in pattern:
            raise ConfigError(f"cache.checkpointPattern: expected a directory-name glob, "
                              f"got {pattern!r}")
        return cls(
            dir=str(data.get("dir", d.dir)),
            capacity_bytes=None if capacity is None else parse_size(capacity,
                                                                    "cache.capacityBytes"),
            capacity_percent=float(percent),
            high_watermark=high,
            low_watermark=low,
            admission_timeout=parse_duration(data.get("admissionTimeout", d.admission_timeout),
                                             "cache.admissionTimeout"),
            keep_last_checkpoints=None if keep is None else _positive_int(
                keep, "cache.keepLastCheckpoints"),
            checkpoint_pattern=pattern,
            cache_ttl=None if ttl is None else parse_duration(ttl, "cache.cacheTTL"),
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "dir": self.dir,
            "capacityPercent": self.capacity_percent,
            "highWatermark": self.high_watermark,
            "lowWatermark": self.low_watermark,
            "admissionTimeout": self.admission_timeout,
            "checkpointPattern": self.checkpoint_pattern,
        }
        if self.capacity_bytes is not None:
            out["capacityBytes"] = self.capacity_bytes
        if self.keep_last_checkpoints is not None:
            out["keepLastCheckpoints"] = self.keep_last_checkpoints
        if self.cache_ttl is not None:
            out["cacheTTL"] = self.cache_ttl
        return out


@dataclass(frozen=True)
class DrainPolicy:
    """What a drain (API call, SIGTERM, node removal) does."""

    new_writes: str = "hold"
    """``hold``: new writes wait until the drain ends; ``reject``: they fail with EROFS."""
    timeout: float = 3600.0
    """Seconds a drain may take; after that it reports what is left and keeps running."""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DrainPolicy:
        _check_keys(data, {"newWrites", "timeout"}, "drain")
        d = cls()
        return cls(
            new_writes=_enum(data.get("newWrites", d.new_writes), ("hold", "reject"),
                             "drain.newWrites"),
            timeout=parse_duration(data.get("timeout", d.timeout), "drain.timeout"),
        )

    def to_dict(self) -> dict[str, Any]:
        return {"newWrites": self.new_writes, "timeout": self.timeout}


@dataclass(frozen=True)
class S3EndpointConfig:
    """The node's S3-compatible endpoint over the cache namespace (off unless an address is
    given). Served by cistern.cachenode.s3api; see docs/s3-endpoint.md."""

    listen: str | None = None
    """HOST:PORT for the HTTP endpoint (e.g. the node IP, reachable by pods on this node)."""
    socket: str | None = None
    """Path of a unix socket serving the same endpoint (for pods that mount it)."""
    credentials_dir: str | None = None
    """Directory holding the files ``accessKeyId`` and ``secretAccessKey`` (a mounted Secret);
    every request must be signed (AWS SigV4) with them."""
    bucket: str | None = None
    """Bucket name clients use (path-style); default: the store's bucket name."""

    @property
    def enabled(self) -> bool:
        return bool(self.listen or self.socket)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> S3EndpointConfig:
        _check_keys(data, {"listen", "socket", "credentialsDir", "bucket"}, "s3Endpoint")
        listen = data.get("listen") or None
        if listen is not None:
            parse_hostport(str(listen), "s3Endpoint.listen")
        out = cls(listen=str(listen) if listen else None, socket=data.get("socket") or None,
                  credentials_dir=data.get("credentialsDir") or None,
                  bucket=data.get("bucket") or None)
        if out.enabled and not out.credentials_dir:
            raise ConfigError("s3Endpoint: credentialsDir is required when the endpoint is on "
                              "(requests are authenticated with AWS SigV4)")
        return out

    def to_dict(self) -> dict[str, Any]:
        pairs = (("listen", self.listen), ("socket", self.socket),
                 ("credentialsDir", self.credentials_dir), ("bucket", self.bucket))
        return {k: v for k, v in pairs if v}


@dataclass(frozen=True)
class NodeConfig:
    """Everything one cache node daemon needs; one per WriteCache per node."""

    store: StoreConfig
    mount: str = "/var/lib/cistern/mounts/default"
    """Where the FUSE file system is mounted."""
    cache: CacheConfig = field(default_factory=CacheConfig)
    flush: FlushPolicy = field(default_factory=FlushPolicy)
    drain: DrainPolicy = field(default_factory=DrainPolicy)
    control: str = DEFAULT_CONTROL
    """HOST:PORT of the control API (status, flush, drain, metrics)."""
    control_token_file: str | None = None
    """File holding a bearer token required by mutating control calls; None: loopback only."""
    fuse_frontend: str = "auto"
    """``auto``, ``passthrough`` or ``pyfuse3``."""
    allow_other: bool = True
    """Let other users (pods) use the mount; requires root or user_allow_other."""
    s3_endpoint: S3EndpointConfig = field(default_factory=S3EndpointConfig)
    """The S3-compatible endpoint over the same namespace (off by default)."""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> NodeConfig:
        if not isinstance(data, Mapping):
            raise ConfigError(f"node config: expected a mapping, got {type(data).__name__}")
        _check_keys(data, {"store", "mount", "cache", "flush", "drain", "control",
                           "controlTokenFile", "fuseFrontend", "allowOther", "s3Endpoint"},
                    "node config")
        d = cls(store=StoreConfig(url="file:///"))
        control = str(data.get("control", d.control))
        parse_hostport(control, "control")
        return cls(
            store=StoreConfig.from_dict(_section(data, "store")),
            mount=str(data.get("mount", d.mount)),
            cache=CacheConfig.from_dict(_section(data, "cache")),
            flush=FlushPolicy.from_dict(_section(data, "flush")),
            drain=DrainPolicy.from_dict(_section(data, "drain")),
            control=control,
            control_token_file=data.get("controlTokenFile") or None,
            fuse_frontend=_enum(data.get("fuseFrontend", d.fuse_frontend),
                                ("auto", "passthrough", "pyfuse3"), "fuseFrontend"),
            allow_other=bool(data.get("allowOther", d.allow_other)),
            s3_endpoint=S3EndpointConfig.from_dict(_section(data, "s3Endpoint")),
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "store": self.store.to_dict(),
            "mount": self.mount,
            "cache": self.cache.to_dict(),
            "flush": self.flush.to_dict(),
            "drain": self.drain.to_dict(),
            "control": self.control,
            "fuseFrontend": self.fuse_frontend,
            "allowOther": self.allow_other,
        }
        if self.control_token_file:
            out["controlTokenFile"] = self.control_token_file
        if self.s3_endpoint.enabled:
            out["s3Endpoint"] = self.s3_endpoint.to_dict()
        return out

    def replace(self, **changes: Any) -> NodeConfig:
        return dataclasses.replace(self, **changes)


def parse_hostport(value: str, where: str = "address") -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"{where}: expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


def load_node_config(path: str | Path) -> dict[str, Any]:
    """Read a YAML (or JSON) node config file into a plain mapping (validated by the caller)."""
    import yaml

    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping at the top level")
    return data

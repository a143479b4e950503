"""The node configuration: one schema shared by the node daemon, the operator and the CSI driver.

The operator renders a WriteCache spec into a ``NodeConfig`` and stores ``NodeConfig.to_dict()``
as YAML in a ConfigMap; the node daemon parses the same YAML with ``NodeConfig.from_dict()``.
Keys are camelCase, the same names the WriteCache CRD uses.

Each key is declared once, as a dataclass field made by ``setting(key, default, parser, doc,
shown=...)`` (see cistern.configschema): the field, its default, how it is parsed and
validated, how it is written back and its documentation. docs/configuration.md is checked
against these declarations by tests/unit/config/test_config_docs.py.

Sizes accept integers (bytes) or strings with a binary or decimal suffix ("16Mi", "1G").
Durations accept numbers (seconds) or strings ("500ms", "30s", "5m", "1h"); they are finite.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal
from urllib.parse import urlparse

from cistern.configschema import (
    ConfigError,
    Section,
    boolean,
    check_bucket_name,
    choice,
    duration,
    fraction,
    name_glob,
    name_globs,
    optional,
    parse_duration,
    parse_size,
    percent,
    positive_int,
    rate,
    required,
    required_section,
    section,
    setting,
    size,
    text,
)
from cistern.peerconfig import DurabilityPolicy, PeersConfig

__all__ = [
    "DEFAULT_COMMIT_MARKERS",
    "DEFAULT_STREAM_EXCLUDE",
    "DEFAULT_CONTROL",
    "CacheConfig",
    "ConfigError",
    "DrainPolicy",
    "FlushMode",
    "FlushPolicy",
    "FuseFrontend",
    "NewWrites",
    "NodeConfig",
    "S3EndpointConfig",
    "StoreConfig",
    "check_bucket_name",
    "load_node_config",
    "parse_duration",
    "parse_hostport",
    "parse_size",
]

DEFAULT_CONTROL = "127.0.0.1:9464"
#: Files frameworks write last: PyTorch DCP, Orbax, Megatron.
DEFAULT_COMMIT_MARKERS: tuple[str, ...] = (
    ".metadata",
    "commit_success.txt",
    "latest_checkpointed_iteration.txt",
)
#: Names that look temporary (the file's or a directory's): not streamed, they wait for the
#: rename (torch.save to x.tmp then rename, DCP's .metadata.tmp, staging directories).
DEFAULT_STREAM_EXCLUDE: tuple[str, ...] = ("*.tmp", "*.partial", "*.tmp.*", "*~")

FlushMode = Literal["writeBack", "writeThrough"]
NewWrites = Literal["hold", "reject"]
FuseFrontend = Literal["auto", "passthrough", "splice", "pyfuse3"]

_MIN_PART = 5 * 2**20
_MAX_PART = 5 * 2**30


def parse_hostport(value: str, where: str = "address") -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"{where}: expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


def _is_loopback(host: str) -> bool:
    """``localhost`` or a loopback IP (127.0.0.0/8, ::1); tenancy (issue 13)."""
    import ipaddress

    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _hostport(value: Any, where: str) -> str:
    parse_hostport(text(value, where), where)
    return str(value)


def _store_url(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: required, e.g. s3://bucket/prefix or file:///srv/objects")
    parsed = urlparse(value)
    if parsed.scheme == "s3":
        check_bucket_name(parsed.netloc, where)
        if ".." in parsed.path.split("/"):
            raise ConfigError(f"{where}: the prefix must not contain '..'")
    elif parsed.scheme == "file":
        if parsed.netloc or not parsed.path.startswith("/"):
            raise ConfigError(f"{where}: file URLs need an absolute path: file:///srv/objects")
    else:
        raise ConfigError(f"{where}: unsupported scheme {parsed.scheme!r}; use s3:// or file://")
    return value


def _unset_if_empty(parse: Any) -> Any:
    """An empty string is as good as unset (how the operator renders an absent endpoint)."""
    def parse_or_none(value: Any, where: str) -> Any:
        return None if value is None or value == "" else parse(value, where)
    return parse_or_none


@dataclass(frozen=True)
class StoreConfig(Section):
    """``store``: where the system of record lives."""

    WHERE: ClassVar[str] = "store"

    url: str = required(
        "url", _store_url,
        "`s3://bucket[/prefix]` or `file:///absolute/path` (a local directory as object "
        "store: the embedded default and demos)",
        example="s3://bucket/prefix or file:///srv/objects")
    endpoint_url: str | None = setting(
        "endpointUrl", None, _unset_if_empty(text),
        "S3 endpoint of an S3-compatible server (MinIO, Ceph RGW, moto)", shown="AWS")
    region: str | None = setting(
        "region", None, _unset_if_empty(text), "S3 region",
        shown="boto3's default, else `us-east-1`")
    path_style: bool = setting(
        "pathStyle", False, boolean, "path-style addressing (a YAML boolean)",
        shown="`false` (`true` when `--endpoint-url` is given)")
    keep_last_checkpoints: int | None = setting(
        "keepLastCheckpoints", None, optional(positive_int),
        "opt-in retention in the object store: keep the newest N checkpoint directories (by "
        "`cache.checkpointPattern`) and delete older ones once they are fully durable. "
        "Nothing in S3 is deleted unless you set this", shown="unset: never delete")

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


@dataclass(frozen=True)
class FlushPolicy(Section):
    """``flush``: how and when dirty data goes to the object store."""

    WHERE: ClassVar[str] = "flush"

    mode: FlushMode = setting(
        "mode", "writeBack", choice(FlushMode),
        "`writeBack`: `close`/`fsync` return at local-disk speed. `writeThrough`: `close` and "
        "`fsync` return only once the object is in S3", shown="`writeBack`")
    upload_delay: float = setting(
        "uploadDelay", 1.0, duration(),
        "a closed file rests this long before upload, so temp files renamed or deleted in the "
        "meantime cost no S3 request (`0`: at once; commit markers never rest: they wait for "
        "their shards instead)", shown="`1s`")
    max_concurrent_uploads: int = setting(
        "maxConcurrentUploads", 4, positive_int,
        "files uploaded at once (and files streamed at once)", shown="`4`")
    max_concurrent_parts: int = setting(
        "maxConcurrentParts", 8, positive_int,
        "multipart parts in flight for the whole node, streamed or not (each stream keeps at "
        "most 4 of them); 8 measured best at 35 ms (docs/benchmarks.md)", shown="`8`")
    part_size: int = setting(
        "partSize", 16 * 2**20, size(minimum=_MIN_PART, maximum=_MAX_PART,
                                     bounds="between 5Mi and 5Gi"),
        "multipart part size (5Mi–5Gi; grown automatically past 10,000 parts)",
        shown="`16Mi`")
    multipart_threshold: int = setting(
        "multipartThreshold", 32 * 2**20, size(),
        "files at least this large use multipart upload", shown="`32Mi`")
    max_bytes_per_second: float | None = setting(
        "maxBytesPerSecond", None, optional(rate),
        "token bucket on upload bandwidth for the whole node", shown="unlimited")
    max_requests_per_second: float | None = setting(
        "maxRequestsPerSecond", None, optional(rate),
        "token bucket on S3 requests for the whole node; when S3 throttles (503 SlowDown) the "
        "rate is cut multiplicatively and recovers gradually, never above this ceiling",
        shown="unlimited")
    evacuation_bytes_per_second: float | None = setting(
        "evacuationBytesPerSecond", None, optional(rate),
        "upload bandwidth during a drain (replaces `maxBytesPerSecond` while draining)",
        shown="unlimited")
    commit_markers: tuple[str, ...] = setting(
        "commitMarkers", DEFAULT_COMMIT_MARKERS, name_globs,
        "file-name globs uploaded only after every other file below the marker's directory "
        "that was being written before it is durable, so an S3 reader never sees a "
        "\"complete\" checkpoint with missing shards (PyTorch DCP, Orbax, Megatron)",
        shown="`.metadata`, `commit_success.txt`, `latest_checkpointed_iteration.txt`")
    streaming: bool = setting(
        "streaming", True, boolean,
        "write-back mode: a file written at a final name that reaches `multipartThreshold` "
        "while open starts its multipart upload and full parts leave as they fill; the upload "
        "completes right after close (no `uploadDelay`). Parts sent early are checked against "
        "the final content (XXH3) and re-sent if rewritten; a file truncated below the parts "
        "sent, renamed or unlinked is uploaded again from the start (the multipart upload is "
        "aborted). See docs/dev/cachenode.md", shown="`true`")
    stream_exclude: tuple[str, ...] = setting(
        "streamExclude", DEFAULT_STREAM_EXCLUDE, name_globs,
        "name globs matched against the file's name and every directory above it: such files "
        "are never streamed, they wait for their rename (`torch.save` to `x.tmp` + rename, "
        "DCP's `.metadata.tmp`, a staging directory `step-1.tmp/`) so the object is written "
        "once, at its final key (but see `streamTempSuffixes`)",
        shown='`"*.tmp"`, `"*.partial"`, `"*.tmp.*"`, `"*~"`')
    stream_temp_suffixes: tuple[str, ...] = setting(
        "streamTempSuffixes", (".tmp",), name_globs,
        "a file excluded by `streamExclude` only for its own name, and whose name ends in one "
        "of these suffixes, streams under the name without it (`model.pt.tmp` -> `model.pt`): "
        "the multipart upload is completed only once the file is renamed to that name, and "
        "aborted if it is renamed elsewhere, deleted or left at its temporary name (`[]`: "
        "temporary names wait for their rename)", shown='`".tmp"`')

    def is_commit_marker(self, name: str) -> bool:
        # One compiled pattern instead of a fnmatch per glob: 0.1 us instead of 1.8 us, and
        # it runs for every file created and every pending file the flusher looks at.
        return _glob_matcher(self.commit_markers)(name) is not None


@functools.lru_cache(maxsize=32)
def _glob_matcher(globs: tuple[str, ...]) -> Callable[[str], re.Match[str] | None]:
    """A ``match`` that succeeds where ``fnmatchcase`` with any of ``globs`` would."""
    if not globs:
        return lambda name: None
    return re.compile("|".join(f"(?:{fnmatch.translate(g)})" for g in globs)).match


@dataclass(frozen=True)
class CacheConfig(Section):
    """``cache``: the local NVMe cache."""

    WHERE: ClassVar[str] = "cache"

    dir: str = setting(
        "dir", "/var/lib/cistern/cache", text,
        "data files and the journal (`journal.sqlite`, SQLite WAL); put it on NVMe",
        shown="`/var/lib/cistern/cache` (`./.cistern/cache` for `cistern-node run` without "
              "flags)")
    capacity_bytes: int | None = setting(
        "capacityBytes", None, optional(size(minimum=1, bounds="greater than zero")),
        "bytes the cache may use", shown="unset")
    capacity_percent: float = setting(
        "capacityPercent", 90.0, percent,
        "share of the cache file system used when `capacityBytes` is unset", shown="`90`")
    high_watermark: float = setting(
        "highWatermark", 0.9, fraction,
        "above this share of capacity, clean data is evicted (LRU), and writers are slowed "
        "once *dirty* data passes it", shown="`0.9`")
    low_watermark: float = setting(
        "lowWatermark", 0.8, fraction, "eviction stops here; below `highWatermark`",
        shown="`0.8`")
    admission_timeout: float = setting(
        "admissionTimeout", 30.0, duration(),
        "how long a writer is held when dirty data fills the capacity; after that a new file "
        "is refused with `ENOSPC` (an open file keeps writing)", shown="`30s`")
    keep_last_checkpoints: int | None = setting(
        "keepLastCheckpoints", None, optional(positive_int),
        "keep the newest N checkpoint directories cached locally; older ones are dropped from "
        "the local disk once clean (they stay in S3 and are fetched again on read)",
        shown="unset")
    checkpoint_pattern: str = setting(
        "checkpointPattern", "step-*", name_glob,
        "glob on directory names that identifies checkpoints; \"newest\" is by name with "
        "numbers compared as numbers (`step-10` after `step-9`), then by mtime",
        shown="`step-*`")
    cache_ttl: float | None = setting(
        "cacheTTL", None, optional(duration(positive=True)),
        "clean files not opened for this long are dropped from the local disk", shown="unset")
    revalidate_after: float | None = setting(
        "revalidateAfter", None, optional(duration(positive=True)),
        "a clean cached file opened this long after it was last checked against the store "
        "(and on its first open after a restart) is checked again (HEAD, ETag compared); if "
        "another writer changed the object, the local copy is dropped and fetched again. "
        "A directory looked at this long after its last listing (and on its first look after "
        "a restart) is listed again: objects another writer added appear, files whose object "
        "was deleted or replaced follow. Dirty files are never replaced or dropped",
        shown="unset")

    def __post_init__(self) -> None:
        if self.low_watermark >= self.high_watermark:
            raise ConfigError(f"{self.WHERE}.lowWatermark ({self.low_watermark}) must be below "
                              f"highWatermark ({self.high_watermark})")


@dataclass(frozen=True)
class DrainPolicy(Section):
    """``drain``: what a drain (API call, SIGTERM, node removal) does."""

    WHERE: ClassVar[str] = "drain"

    new_writes: NewWrites = setting(
        "newWrites", "hold", choice(NewWrites),
        "while draining, `hold` makes new writers wait (until `cistern-node resume`); `reject` "
        "fails them with `EROFS`", shown="`hold`")
    timeout: float = setting(
        "timeout", 3600.0, duration(positive=True),
        "a drain that takes longer reports what is left and keeps the daemon running (it "
        "never exits with dirty data)", shown="`1h`")


@dataclass(frozen=True)
class S3EndpointConfig(Section):
    """``s3Endpoint``: the node's S3-compatible endpoint over the cache namespace, served by
    cistern.cachenode.s3api (docs/s3-endpoint.md). Off unless an address is given."""

    WHERE: ClassVar[str] = "s3Endpoint"

    listen: str | None = setting(
        "listen", None, _unset_if_empty(_hostport),
        "`HOST:PORT` of the endpoint (the node's address or loopback)", shown="unset")
    socket: str | None = setting(
        "socket", None, _unset_if_empty(text), "a unix socket serving the same endpoint",
        shown="unset")
    credentials_dir: str | None = setting(
        "credentialsDir", None, _unset_if_empty(text),
        "directory with files `accessKeyId` and `secretAccessKey`; requests must be "
        "SigV4-signed with them (required when the endpoint is on)", shown="unset")
    bucket: str | None = setting(
        "bucket", None, _unset_if_empty(text),
        "bucket name clients use (path-style); unset: the store's bucket", shown="unset")

    @property
    def enabled(self) -> bool:
        return bool(self.listen or self.socket)

    def __post_init__(self) -> None:
        if self.enabled and not self.credentials_dir:
            raise ConfigError(f"{self.WHERE}.credentialsDir: required when the endpoint is on "
                              "(requests are authenticated with AWS SigV4)")


@dataclass(frozen=True)
class NodeConfig(Section):
    """Everything one cache node daemon needs; one per WriteCache per node."""

    WHERE: ClassVar[str] = ""

    store: StoreConfig = required_section("store", StoreConfig, "the system of record")
    mount: str = setting(
        "mount", "/var/lib/cistern/mounts/default", text,
        "FUSE mount point; must exist and be empty",
        shown="`/var/lib/cistern/mounts/default` (`./mnt` from the CLI)")
    cache: CacheConfig = section("cache", CacheConfig, "the local disk")
    flush: FlushPolicy = section("flush", FlushPolicy, "how data reaches the store")
    drain: DrainPolicy = section("drain", DrainPolicy, "evacuating a node")
    control: str = setting(
        "control", DEFAULT_CONTROL, _hostport, "address of the control API",
        shown=f"`{DEFAULT_CONTROL}`")
    control_token_file: str | None = setting(
        "controlTokenFile", None, _unset_if_empty(text),
        "file with a bearer token that `POST /flush`, `/drain`, `/resume` must present; required "
        "(the config is refused without it) when `control` is not a loopback address; an empty "
        "file is refused at start-up", shown="unset")
    fuse_frontend: FuseFrontend = setting(
        "fuseFrontend", "auto", choice(FuseFrontend),
        "`passthrough` (kernel FUSE passthrough: the kernel reads and writes the cache file "
        "directly), `splice` (for kernels without passthrough: file data spliced between /dev/fuse "
        "and the cache file, never copied through Python), `pyfuse3`, or `auto` (passthrough "
        "when the kernel offers it and the daemon has CAP_SYS_ADMIN, else splice)",
        shown="`auto`")
    allow_other: bool = setting(
        "allowOther", True, boolean,
        "let other users (pods) use the mount (a YAML boolean)", shown="`true`")
    fuse_holder: str | None = setting(
        "fuseHolder", None, _unset_if_empty(text),
        "unix socket of a `cistern-node holder`: the mount then survives a crash, restart or "
        "upgrade of the daemon (applications see a pause, not `ENOTCONN`); takeovers need the "
        "passthrough or splice front end (docs/restarts.md)", shown="unset")
    s3_endpoint: S3EndpointConfig = section(
        "s3Endpoint", S3EndpointConfig, "the S3-compatible endpoint (off by default)")
    durability: DurabilityPolicy = section(
        "durability", DurabilityPolicy, "what an fsync waits for (issue 17)")
    peers: PeersConfig = section(
        "peers", PeersConfig, "the other nodes of the WriteCache (issue 17)")

    def __post_init__(self) -> None:
        # tenancy (issue 13): any address but loopback needs a token (docs/security.md).
        host, _ = parse_hostport(self.control, "control")
        if not self.control_token_file and not _is_loopback(host):
            raise ConfigError(f"control: {host} is not a loopback address; set "
                              "controlTokenFile to protect the control API")
        if self.durability.uses_peers and not (self.peers.listen and self.peers.members_file
                                               and self.peers.token_file):
            raise ConfigError("durability: level peers needs peers.listen, "
                              "peers.membersFile and peers.tokenFile")

    def replace(self, **changes: Any) -> NodeConfig:
        return dataclasses.replace(self, **changes)


def load_node_config(path: str | Path) -> dict[str, Any]:
    """Read a YAML (or JSON) node config file into a plain mapping (validated by the caller)."""
    import yaml

    try:
        content = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(content) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping at the top level")
    return data

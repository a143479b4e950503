"""The WriteCache custom resource spec and its rendering into a node configuration.

This is the one place that knows both shapes: the operator parses a WriteCache's ``spec`` with
``WriteCacheSpec.from_dict`` and renders each node daemon's configuration with
``render_node_config``; the daemon reads the result with ``NodeConfig.from_dict``. The CRD's
OpenAPI schema (crds/writecaches.cistern.dev.yaml) rejects most nonsense at admission; this
module re-checks everything the schema cannot express (cross-field rules, bucket names) and
raises ``ConfigError`` with the field path, so the operator can report it in a condition.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cistern.config import (
    CacheConfig,
    ConfigError,
    DrainPolicy,
    FlushPolicy,
    NodeConfig,
    S3EndpointConfig,
    StoreConfig,
)
from cistern.configschema import (
    boolean,
    check_bucket_name,
    choice,
    duration,
    name_glob,
    positive_int,
)
from cistern.peerconfig import DurabilityPolicy, PeersConfig, Transport

__all__ = [
    "CSI_DRIVER_NAME",
    "DEFAULT_CACHE_HOST_PATH",
    "DEFAULT_MOUNT_ROOT",
    "CSISpec",
    "CacheSpec",
    "ObjectStoreSpec",
    "RetentionSpec",
    "AccessSpec",
    "DEFAULT_PEER_PORT",
    "DEFAULT_S3_ENDPOINT_PORT",
    "PEER_MEMBERS_KEY",
    "PEER_TOKEN_KEY",
    "PeerNetworkSpec",
    "S3EndpointSpec",
    "WriteCacheSpec",
    "cache_key",
    "render_node_config",
    "storage_class_name",
]

CSI_DRIVER_NAME = "csi.cistern.dev"
DEFAULT_MOUNT_ROOT = "/var/lib/cistern/mounts"
DEFAULT_CACHE_HOST_PATH = "/var/lib/cistern/cache"
DEFAULT_S3_ENDPOINT_PORT = 9470
DEFAULT_PEER_PORT = 9471
#: File names (ConfigMap / Secret keys) of the peer members list and the peer token.
PEER_MEMBERS_KEY = "members.json"
PEER_TOKEN_KEY = "token"

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?")


_CACHE_KEY_MAX = 63


def cache_key(namespace: str, name: str) -> str:
    r"""The node-wide name of WriteCache ``namespace/name``; unique across namespaces.

    It names the mount ``<mountRoot>/<key>``, the node label and CSI topology key
    ``csi.cistern.dev/<key>``, the access policy ``<key>.json`` and the operator's objects
    (the host cache directory is ``<hostPath>/<namespace>/<name>``), so it is at most 63
    characters of ``[a-z0-9.\-_]``: ``<namespace>.<name>``
    (namespaces and WriteCache names are DNS labels, so the first dot separates them), or, when
    that is longer, its first 46 characters, ``_`` and 16 hex digits of its SHA-256 (``_``
    never occurs in the plain form, so a hashed key never equals a plain one). Without a
    namespace (a stand-alone daemon, tests) the key is the name itself.
    """
    plain = f"{namespace}.{name}" if namespace else name
    if len(plain) <= _CACHE_KEY_MAX:
        return plain
    digest = hashlib.sha256(f"{namespace}/{name}".encode()).hexdigest()[:16]
    return f"{plain[:_CACHE_KEY_MAX - 17]}_{digest}"


def _mapping(data: Mapping[str, Any], key: str, where: str) -> Mapping[str, Any]:
    value = data.get(key) or {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}.{key}: expected a mapping, got {value!r}")
    return value


def _known(data: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)}; "
                          f"known: {', '.join(sorted(allowed))}")


@dataclass(frozen=True)
class ObjectStoreSpec:
    """``spec.objectStore``: the S3 bucket that is the system of record."""

    bucket: str
    """Bucket name (S3 naming rules)."""
    prefix: str = ""
    """Key prefix inside the bucket, without leading or trailing slashes."""
    endpoint: str | None = None
    """S3 endpoint URL for S3-compatible stores (MinIO, Ceph RGW); None for AWS."""
    region: str | None = None
    """Region; None lets the SDK decide."""
    path_style: bool = False
    """Path-style addressing, needed by most S3-compatible servers."""
    credentials_secret: str | None = None
    """Name of a Secret in the WriteCache's namespace with AWS_ACCESS_KEY_ID and
    AWS_SECRET_ACCESS_KEY (and optionally AWS_SESSION_TOKEN); None: the node's own identity."""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ObjectStoreSpec:
        where = "spec.objectStore"
        _known(data, {"bucket", "prefix", "endpoint", "region", "pathStyle",
                      "credentialsSecretRef"}, where)
        bucket = check_bucket_name(data.get("bucket"), f"{where}.bucket")
        prefix = str(data.get("prefix") or "").strip("/")
        if ".." in prefix.split("/"):
            raise ConfigError(f"{where}.prefix: must not contain '..'")
        endpoint = data.get("endpoint") or None
        if endpoint is not None and not re.fullmatch(r"https?://[^\s/]+(/\S*)?", str(endpoint)):
            raise ConfigError(f"{where}.endpoint: expected an http(s) URL, got {endpoint!r}")
        ref = _mapping(data, "credentialsSecretRef", where)
        secret = ref.get("name") if ref else None
        if ref and (not isinstance(secret, str) or not _DNS_SUBDOMAIN.fullmatch(secret)):
            raise ConfigError(f"{where}.credentialsSecretRef.name: expected a Secret name, "
                              f"got {secret!r}")
        return cls(bucket=bucket, prefix=prefix, endpoint=endpoint,
                   region=data.get("region") or None,
                   path_style=boolean(data.get("pathStyle", False), f"{where}.pathStyle"),
                   credentials_secret=secret)

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"


@dataclass(frozen=True)
class CacheSpec:
    """``spec.cache``: the node-local cache directory and its size."""

    host_path: str = DEFAULT_CACHE_HOST_PATH
    """Host directory (on NVMe); each WriteCache uses ``<hostPath>/<namespace>/<name>``."""
    config: CacheConfig = field(default_factory=CacheConfig)
    """Capacity, watermarks and admission timeout, as the daemon reads them."""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CacheSpec:
        where = "spec.cache"
        _known(data, {"hostPath", "capacityBytes", "capacityPercent", "highWatermark",
                      "lowWatermark", "admissionTimeout"}, where)
        host_path = str(data.get("hostPath") or DEFAULT_CACHE_HOST_PATH)
        if not host_path.startswith("/") or ".." in host_path.split("/"):
            raise ConfigError(f"{where}.hostPath: expected an absolute path without '..', "
                              f"got {host_path!r}")
        settings = {key: data[key] for key in ("capacityBytes", "capacityPercent",
                                               "highWatermark", "lowWatermark",
                                               "admissionTimeout") if key in data}
        try:
            config = CacheConfig.from_dict(settings)
        except ConfigError as exc:
            raise ConfigError(f"spec.{exc}") from exc
        return cls(host_path=host_path.rstrip("/") or "/", config=config)


@dataclass(frozen=True)
class RetentionSpec:
    """``spec.retention``: what stays in the local cache and in the bucket."""

    keep_last_checkpoints: int | None = None
    """Keep the newest N checkpoint directories cached locally."""
    keep_last_checkpoints_in_store: int | None = None
    """Opt-in: delete older checkpoints from the bucket, keeping the newest N."""
    checkpoint_pattern: str = "step-*"
    """Glob on directory names that identifies checkpoint directories."""
    cache_ttl: float | None = None
    """Clean data not read for this long is dropped from the local cache."""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RetentionSpec:
        where = "spec.retention"
        _known(data, {"keepLastCheckpoints", "keepLastCheckpointsInStore", "checkpointPattern",
                      "cacheTTL"}, where)
        keep, keep_in_store, ttl = (data.get(key) for key in (
            "keepLastCheckpoints", "keepLastCheckpointsInStore", "cacheTTL"))
        return cls(
            keep_last_checkpoints=None if keep is None else positive_int(
                keep, f"{where}.keepLastCheckpoints"),
            keep_last_checkpoints_in_store=None if keep_in_store is None else positive_int(
                keep_in_store, f"{where}.keepLastCheckpointsInStore"),
            checkpoint_pattern=name_glob(data.get("checkpointPattern", "step-*"),
                                         f"{where}.checkpointPattern"),
            cache_ttl=None if ttl is None else duration(positive=True)(ttl, f"{where}.cacheTTL"))


@dataclass(frozen=True)
class CSISpec:
    """``spec.csi``: the StorageClass PVCs use to get a volume in this cache."""

    storage_class_name: str | None = None
    """StorageClass name; None: ``cistern-<WriteCache name>``."""
    reclaim_policy: str = "Delete"
    """``Delete`` removes a released volume's directory (and its objects); ``Retain`` keeps it."""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CSISpec:
        where = "spec.csi"
        _known(data, {"storageClassName", "reclaimPolicy"}, where)
        name = data.get("storageClassName") or None
        if name is not None and (not isinstance(name, str) or len(name) > 253
                                 or not _DNS_SUBDOMAIN.fullmatch(name)):
            raise ConfigError(f"{where}.storageClassName: {name!r} is not a valid object name")
        policy = data.get("reclaimPolicy", "Delete")
        if policy not in ("Delete", "Retain"):
            raise ConfigError(f"{where}.reclaimPolicy: expected Delete or Retain, got {policy!r}")
        return cls(storage_class_name=name, reclaim_policy=policy)


@dataclass(frozen=True)
class AccessSpec:
    """``spec.access``: which namespaces may use this cache (its own always may)."""

    namespaces: tuple[str, ...] = ()
    """Namespaces (besides the WriteCache's own) whose pods and PVCs may use the cache;
    ``*``: every namespace."""
    namespace_selector: dict[str, Any] | None = None
    """A label selector (``matchLabels``/``matchExpressions``) over namespaces that may use
    it; the operator resolves it to a list."""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AccessSpec:
        where = "spec.access"
        _known(data, {"namespaces", "namespaceSelector"}, where)
        names = data.get("namespaces") or []
        if not isinstance(names, list) or not all(
                isinstance(n, str) and (n == "*" or (len(n) <= 63 and _DNS_LABEL.fullmatch(n)))
                for n in names):
            raise ConfigError(f"{where}.namespaces: expected a list of namespace names or '*'")
        selector = data.get("namespaceSelector")
        if selector is not None:
            if not isinstance(selector, Mapping):
                raise ConfigError(f"{where}.namespaceSelector: expected a label selector")
            _known(selector, {"matchLabels", "matchExpressions"}, f"{where}.namespaceSelector")
        return cls(namespaces=tuple(dict.fromkeys(names)),
                   namespace_selector=dict(selector) if selector is not None else None)


@dataclass(frozen=True)
class S3EndpointSpec:
    """``spec.s3Endpoint``: the nodes' S3-compatible endpoint (docs/s3-endpoint.md)."""

    enabled: bool = False
    port: int = DEFAULT_S3_ENDPOINT_PORT
    """TCP port of the endpoint on each daemon pod and of its node-local Service."""
    credentials_secret: str | None = None
    """Secret in the WriteCache's namespace with ``accessKeyId`` and ``secretAccessKey``: what
    clients sign requests with (not the bucket's credentials). Required when enabled."""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> S3EndpointSpec:
        where = "spec.s3Endpoint"
        _known(data, {"enabled", "port", "credentialsSecretRef"}, where)
        enabled = boolean(data.get("enabled", False), f"{where}.enabled")
        port = _port(data.get("port", DEFAULT_S3_ENDPOINT_PORT), f"{where}.port")
        ref = _mapping(data, "credentialsSecretRef", where)
        secret = ref.get("name") if ref else None
        if ref and (not isinstance(secret, str) or len(secret) > 253
                    or not _DNS_SUBDOMAIN.fullmatch(secret)):
            raise ConfigError(f"{where}.credentialsSecretRef.name: expected a Secret name, "
                              f"got {secret!r}")
        if enabled and not secret:
            raise ConfigError(f"{where}.credentialsSecretRef: required when the endpoint is "
                              "enabled (requests are authenticated with AWS SigV4 against the "
                              "keys accessKeyId and secretAccessKey of that Secret)")
        return cls(enabled=enabled, port=port, credentials_secret=secret)


def _port(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1024 <= value <= 65535:
        raise ConfigError(f"{where}: expected a port number from 1024 to 65535, got {value!r}")
    return value


@dataclass(frozen=True)
class PeerNetworkSpec:
    """``spec.peers``: how the daemons of this WriteCache reach each other (issue 17; used only
    when ``spec.durability`` asks for peer copies)."""

    port: int = DEFAULT_PEER_PORT
    """TCP port of the peer server on each daemon pod's IP."""
    transport: Transport = "auto"
    """``auto``, ``tcp`` or ``rdma`` (falls back to TCP with the reason in the status)."""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PeerNetworkSpec:
        where = "spec.peers"
        _known(data, {"port", "transport"}, where)
        return cls(port=_port(data.get("port", DEFAULT_PEER_PORT), f"{where}.port"),
                   transport=choice(Transport)(data.get("transport", "auto"),
                                               f"{where}.transport"))


@dataclass(frozen=True)
class WriteCacheSpec:
    """A parsed, validated WriteCache ``spec``."""

    object_store: ObjectStoreSpec
    node_selector: dict[str, str] = field(default_factory=dict)
    """Labels a node needs to run this cache's daemon (and so to host its volumes)."""
    tolerations: tuple[dict[str, Any], ...] = ()
    """Pod tolerations for the daemon, e.g. for dedicated GPU nodes."""
    cache: CacheSpec = field(default_factory=CacheSpec)
    flush: FlushPolicy = field(default_factory=FlushPolicy)
    retention: RetentionSpec = field(default_factory=RetentionSpec)
    drain: DrainPolicy = field(default_factory=DrainPolicy)
    csi: CSISpec = field(default_factory=CSISpec)
    resources: dict[str, Any] = field(default_factory=dict)
    """Daemon container resources (requests/limits); empty: the operator's defaults."""
    access: AccessSpec = field(default_factory=AccessSpec)
    s3_endpoint: S3EndpointSpec = field(default_factory=S3EndpointSpec)
    durability: DurabilityPolicy = field(default_factory=DurabilityPolicy)
    """What an ``fsync`` waits for: ``local``, ``peers`` (N copies on other nodes) or ``s3``."""
    peers: PeerNetworkSpec = field(default_factory=PeerNetworkSpec)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> WriteCacheSpec:
        if not isinstance(data, Mapping):
            raise ConfigError(f"spec: expected a mapping, got {type(data).__name__}")
        _known(data, {"objectStore", "nodeSelector", "tolerations", "cache", "flush",
                      "retention", "drain", "csi", "resources", "access", "s3Endpoint",
                      "durability", "peers"}, "spec")
        if not data.get("objectStore"):
            raise ConfigError("spec.objectStore: required (at least objectStore.bucket)")
        selector = _mapping(data, "nodeSelector", "spec")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in selector.items()):
            raise ConfigError("spec.nodeSelector: keys and values must be strings")
        tolerations = data.get("tolerations") or []
        if not isinstance(tolerations, list) or not all(isinstance(t, Mapping)
                                                         for t in tolerations):
            raise ConfigError("spec.tolerations: expected a list of toleration objects")
        try:
            flush = FlushPolicy.from_dict(_mapping(data, "flush", "spec"))
            drain = DrainPolicy.from_dict(_mapping(data, "drain", "spec"))
            durability = DurabilityPolicy.from_dict(_mapping(data, "durability", "spec"))
        except ConfigError as exc:
            raise ConfigError(f"spec.{exc}") from exc
        return cls(
            object_store=ObjectStoreSpec.from_dict(_mapping(data, "objectStore", "spec")),
            node_selector=dict(selector),
            tolerations=tuple(dict(t) for t in tolerations),
            cache=CacheSpec.from_dict(_mapping(data, "cache", "spec")),
            flush=flush,
            retention=RetentionSpec.from_dict(_mapping(data, "retention", "spec")),
            drain=drain,
            csi=CSISpec.from_dict(_mapping(data, "csi", "spec")),
            resources=dict(_mapping(data, "resources", "spec")),
            access=AccessSpec.from_dict(_mapping(data, "access", "spec")),
            s3_endpoint=S3EndpointSpec.from_dict(_mapping(data, "s3Endpoint", "spec")),
            durability=durability,
            peers=PeerNetworkSpec.from_dict(_mapping(data, "peers", "spec")),
        )


def storage_class_name(name: str, spec: WriteCacheSpec) -> str:
    """The StorageClass a WriteCache owns: ``spec.csi.storageClassName`` or ``cistern-<name>``."""
    return spec.csi.storage_class_name or f"cistern-{name}"


def render_node_config(
    name: str,
    spec: WriteCacheSpec,
    *,
    namespace: str = "",
    mount_root: str = DEFAULT_MOUNT_ROOT,
    cache_dir: str | None = None,
    control: str = "127.0.0.1:9464",
    control_token_file: str | None = None,
    s3_credentials_dir: str = "/etc/cistern-s3",
    peer_members_dir: str = "/etc/cistern-peers",
    peer_token_dir: str = "/etc/cistern-peer-token",
) -> NodeConfig:
    """The configuration the daemon of WriteCache ``name`` runs with on every selected node.

    ``cache_dir`` is where the daemon sees its cache directory (inside its container);
    by default ``spec.cache.hostPath`` itself. The FUSE mount is
    ``<mount_root>/<cache_key(namespace, name)>``, where the CSI driver looks for it.
    With ``spec.s3Endpoint.enabled`` the daemon serves S3 on ``0.0.0.0:<port>`` of its own
    network namespace (the pod's IP), checking signatures against ``s3_credentials_dir``.
    When ``spec.durability`` uses peer copies, the peer server listens on
    ``0.0.0.0:<spec.peers.port>`` (the pod's IP) and reads the members list from
    ``peer_members_dir`` and the shared token from ``peer_token_dir`` (a ConfigMap and a Secret
    the operator keeps); the node's name
    among the members is given on the command line (``--peer-node-name``), per pod.
    """
    if not _DNS_LABEL.fullmatch(name) or len(name) > 63:
        raise ConfigError(f"metadata.name: {name!r} must be a DNS label (a-z, 0-9, '-')")
    store = spec.object_store
    retention = spec.retention
    cache = spec.cache.config
    return NodeConfig(
        store=StoreConfig(url=store.url, endpoint_url=store.endpoint, region=store.region,
                          path_style=store.path_style,
                          keep_last_checkpoints=retention.keep_last_checkpoints_in_store),
        mount=f"{mount_root.rstrip('/')}/{cache_key(namespace, name)}",
        cache=CacheConfig(
            dir=cache_dir or spec.cache.host_path,
            capacity_bytes=cache.capacity_bytes,
            capacity_percent=cache.capacity_percent,
            high_watermark=cache.high_watermark,
            low_watermark=cache.low_watermark,
            admission_timeout=cache.admission_timeout,
            keep_last_checkpoints=retention.keep_last_checkpoints,
            checkpoint_pattern=retention.checkpoint_pattern,
            cache_ttl=retention.cache_ttl,
        ),
        flush=spec.flush,
        drain=spec.drain,
        control=control,
        control_token_file=control_token_file,
        s3_endpoint=S3EndpointConfig(listen=f"0.0.0.0:{spec.s3_endpoint.port}",
                                     credentials_dir=s3_credentials_dir)
        if spec.s3_endpoint.enabled else S3EndpointConfig(),
        durability=spec.durability,
        peers=PeersConfig(listen=f"0.0.0.0:{spec.peers.port}",
                          members_file=f"{peer_members_dir.rstrip('/')}/{PEER_MEMBERS_KEY}",
                          token_file=f"{peer_token_dir.rstrip('/')}/{PEER_TOKEN_KEY}",
                          transport=spec.peers.transport)
        if spec.durability.uses_peers else PeersConfig(),
    )


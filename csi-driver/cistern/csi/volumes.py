"""Volume identities and capabilities: pure parsing and validation, no I/O.

A Cistern volume is a directory in the namespace of one WriteCache. The node knows a cache by
its key (``cistern.writecache.cache_key``: ``<namespace>.<name>``, bounded, unique across
namespaces). A volume's id is ``<cache-key>/<dir>`` (static PVs and dynamically provisioned
ones), in exactly one spelling: ``wc//x`` or ``wc/x/`` are refused, never read as ``wc/x``.
Inline ephemeral volumes arrive with an id the kubelet made up and name their directory in
``volume_context`` (``writeCache``, optional ``writeCacheNamespace`` (default: the pod's
namespace), ``path``). Every path is confined to the cache namespace: no ``..``, no empty or
absolute components, no NUL; lengths are counted in bytes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from cistern.csi.errors import InvalidArgument
from cistern.csi.proto import csi_pb2
from cistern.writecache import cache_key

__all__ = [
    "CONTEXT_NAMESPACE",
    "CONTEXT_PATH",
    "CONTEXT_POD_NAMESPACE",
    "CONTEXT_WRITE_CACHE",
    "EPHEMERAL_CONTEXT",
    "READ_ONLY_MODES",
    "SUPPORTED_FS_TYPES",
    "SUPPORTED_MOUNT_FLAGS",
    "VolumeRef",
    "check_capability",
    "parse_volume_id",
    "resolve_volume",
    "validate_dir",
    "validate_write_cache",
]

CONTEXT_WRITE_CACHE = "writeCache"
CONTEXT_NAMESPACE = "writeCacheNamespace"
CONTEXT_PATH = "path"
EPHEMERAL_CONTEXT = "csi.storage.k8s.io/ephemeral"
#: Added by the kubelet when the CSIDriver object has ``podInfoOnMount: true``.
CONTEXT_POD_NAMESPACE = "csi.storage.k8s.io/pod.namespace"

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_CACHE_KEY = re.compile(r"[a-z0-9]([-a-z0-9._]*[a-z0-9])?")
_MAX_DIR = 1024
_MAX_COMPONENT = 255

Mode = csi_pb2.VolumeCapability.AccessMode
#: Every access mode but UNKNOWN: the cache namespace is shared by all pods on all nodes that
#: run the cache; multi-node writers write disjoint files (one shard per rank) in practice.
SUPPORTED_MODES = frozenset({
    Mode.SINGLE_NODE_WRITER, Mode.SINGLE_NODE_READER_ONLY, Mode.MULTI_NODE_READER_ONLY,
    Mode.MULTI_NODE_SINGLE_WRITER, Mode.MULTI_NODE_MULTI_WRITER,
    Mode.SINGLE_NODE_SINGLE_WRITER, Mode.SINGLE_NODE_MULTI_WRITER,
})
READ_ONLY_MODES = frozenset({Mode.SINGLE_NODE_READER_ONLY, Mode.MULTI_NODE_READER_ONLY})
#: ``fs_type`` values a mount capability may carry (empty: unspecified).
SUPPORTED_FS_TYPES = frozenset({"", "cistern", "fuse.cistern"})
#: Bind-mount flags NodePublishVolume honours; anything else is INVALID_ARGUMENT.
SUPPORTED_MOUNT_FLAGS = frozenset({"ro", "rw", "nosuid", "nodev", "noexec",
                                   "noatime", "relatime", "nodiratime"})


@dataclass(frozen=True)
class VolumeRef:
    """Where a volume lives: directory ``dir`` in the cache whose key is ``cache``."""

    cache: str
    dir: str

    @property
    def volume_id(self) -> str:
        return f"{self.cache}/{self.dir}"


def validate_namespace(name: str, where: str) -> str:
    if not name or len(name) > 63 or not _DNS_LABEL.fullmatch(name):
        raise InvalidArgument(f"{where}: {name!r} is not a namespace name")
    return name


def validate_write_cache(name: str, where: str = "writeCache") -> str:
    if not name or len(name) > 63 or not _DNS_LABEL.fullmatch(name):
        raise InvalidArgument(f"{where}: {name!r} is not a WriteCache name (a DNS label: "
                              f"a-z, 0-9, '-', at most 63 characters)")
    return name


def validate_dir(path: str, where: str = "path") -> str:
    """Normalise a volume directory: strip surrounding slashes, refuse escapes; return it."""
    if "\x00" in path:
        raise InvalidArgument(f"{where}: must not contain NUL")
    cleaned = path.strip("/")
    if not cleaned:
        raise InvalidArgument(f"{where}: a volume needs a directory below the cache root, "
                              f"got {path!r}")
    if len(cleaned.encode()) > _MAX_DIR:
        raise InvalidArgument(f"{where}: longer than {_MAX_DIR} bytes")
    for part in cleaned.split("/"):
        if part in ("", ".", ".."):
            raise InvalidArgument(f"{where}: {path!r} must not contain empty, '.' or '..' "
                                  f"components")
        if len(part.encode()) > _MAX_COMPONENT:
            raise InvalidArgument(f"{where}: component {part[:20]!r}... is longer than "
                                  f"{_MAX_COMPONENT} bytes")
    return cleaned


def parse_volume_id(volume_id: str) -> VolumeRef | None:
    """``<cache-key>/<dir>`` -> VolumeRef; None if the id does not have that shape.

    Raises InvalidArgument when it has the shape but escapes the namespace (``wc/../x``) or is
    not spelt canonically (``wc//x``, ``wc/x/``: one directory has one id).
    """
    key, sep, rest = volume_id.partition("/")
    if not sep or not rest or len(key) > 63 or not _CACHE_KEY.fullmatch(key):
        return None
    directory = validate_dir(rest, "volume_id")
    if directory != rest:
        raise InvalidArgument(f"volume_id {volume_id!r} is not canonical (expected "
                              f"{key}/{directory}): empty components are not allowed")
    return VolumeRef(key, directory)


def resolve_volume(volume_id: str, context: Mapping[str, str]) -> VolumeRef | None:
    """The volume a request names: ``volume_context`` (writeCache + path) wins, else the id.

    The cache's namespace is ``writeCacheNamespace``, else, for inline (ephemeral) volumes, the
    pod's namespace. None when neither names a volume (the caller answers NOT_FOUND).
    """
    write_cache = context.get(CONTEXT_WRITE_CACHE, "")
    path = context.get(CONTEXT_PATH, "")
    namespace = context.get(CONTEXT_NAMESPACE, "")
    if write_cache or path or namespace:
        if not write_cache or not path:
            raise InvalidArgument(f"volume_context: {CONTEXT_WRITE_CACHE!r} and "
                                  f"{CONTEXT_PATH!r} go together; got "
                                  f"{CONTEXT_WRITE_CACHE}={write_cache!r}, "
                                  f"{CONTEXT_PATH}={path!r}")
        name = validate_write_cache(write_cache, f"volume_context.{CONTEXT_WRITE_CACHE}")
        if namespace:
            validate_namespace(namespace, f"volume_context.{CONTEXT_NAMESPACE}")
        elif context.get(EPHEMERAL_CONTEXT) == "true":
            namespace = context.get(CONTEXT_POD_NAMESPACE, "")
        return VolumeRef(cache_key(namespace, name),
                         validate_dir(path, f"volume_context.{CONTEXT_PATH}"))
    return parse_volume_id(volume_id)


def check_capability(cap: csi_pb2.VolumeCapability, where: str = "volume_capability") -> None:
    """Raise InvalidArgument unless ``cap`` is a mount capability Cistern can serve."""
    if cap.WhichOneof("access_type") == "block":
        raise InvalidArgument(f"{where}: block access is not supported; Cistern volumes are "
                              f"file systems (use access type mount)")
    if cap.WhichOneof("access_type") != "mount":
        raise InvalidArgument(f"{where}: access_type is required (mount)")
    if not cap.HasField("access_mode") or cap.access_mode.mode == Mode.UNKNOWN:
        raise InvalidArgument(f"{where}: access_mode is required")
    if cap.access_mode.mode not in SUPPORTED_MODES:
        raise InvalidArgument(f"{where}: access mode {cap.access_mode.mode} is not supported")
    if cap.mount.fs_type not in SUPPORTED_FS_TYPES:
        raise InvalidArgument(f"{where}: fs_type {cap.mount.fs_type!r} is not supported; "
                              f"Cistern volumes are fuse.cistern (leave fs_type empty)")
    unknown = sorted(set(cap.mount.mount_flags) - SUPPORTED_MOUNT_FLAGS)
    if unknown:
        # Mount flags may hold secrets: name how many, not what they are.
        raise InvalidArgument(f"{where}: {len(unknown)} unsupported mount flag(s); supported: "
                              f"{', '.join(sorted(SUPPORTED_MOUNT_FLAGS))}")


def capabilities_supported(caps: Iterable[csi_pb2.VolumeCapability]) -> str | None:
    """None if every capability is supported, else the reason the first one is not."""
    for cap in caps:
        try:
            check_capability(cap)
        except InvalidArgument as exc:
            return exc.message
    return None

"""The driver's settings: one typed object, built in ``main()`` and passed to constructors."""

from __future__ import annotations

from dataclasses import dataclass

from cistern.writecache import CSI_DRIVER_NAME, DEFAULT_MOUNT_ROOT

DEFAULT_ACCESS_DIR = "/etc/cistern/access"

__all__ = ["DEFAULT_ACCESS_DIR", "DRIVER_NAME", "MODES", "TOPOLOGY_PREFIX", "DriverSettings",
           "socket_path", "topology_key"]

DRIVER_NAME = CSI_DRIVER_NAME
MODES = ("node", "controller", "all")
#: Topology keys are ``csi.cistern.dev/<writecache>`` = ``"true"`` on nodes that run that cache.
TOPOLOGY_PREFIX = f"{DRIVER_NAME}/"


def topology_key(cache: str) -> str:
    """``csi.cistern.dev/<cache-key>`` (the key is at most 63 characters: a valid label name)."""
    return f"{TOPOLOGY_PREFIX}{cache}"


@dataclass(frozen=True)
class DriverSettings:
    """How one ``cistern-csi`` process runs."""

    endpoint: str
    """``unix:///path/to/csi.sock``: where the gRPC server listens."""
    node_id: str
    """This node's name (the Kubernetes node name), returned by NodeGetInfo."""
    mode: str = "all"
    """``node`` (Identity + Node), ``controller`` (Identity + Controller) or ``all``."""
    mount_root: str = DEFAULT_MOUNT_ROOT
    """The daemon of a cache mounts its FUSE file system at ``<mount_root>/<cache-key>``."""
    access_dir: str = DEFAULT_ACCESS_DIR
    """Where the caches' access policies (``<cache-key>.json``) are; see access.py."""
    state_file: str = ""
    """The controller's record of provisioned volumes; empty: memory only."""
    health_timeout: float = 5.0
    """Seconds a cache mount may take to answer ``stat`` before it counts as broken."""
    workers: int = 8
    """gRPC worker threads."""
    version: str = "0.1.0"
    """Reported as ``vendor_version``."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode: expected one of {', '.join(MODES)}, got {self.mode!r}")
        if not self.node_id and self.mode != "controller":
            raise ValueError("node id: required for the node service (--node-id NAME)")
        socket_path(self.endpoint)

    @property
    def runs_node(self) -> bool:
        return self.mode in ("node", "all")

    @property
    def runs_controller(self) -> bool:
        return self.mode in ("controller", "all")


def socket_path(endpoint: str) -> str:
    """``unix:///csi/csi.sock`` (or ``unix:/csi/csi.sock``, or ``/csi/csi.sock``) -> the path."""
    if endpoint.startswith("unix://"):
        path = endpoint[len("unix://"):]
    elif endpoint.startswith("unix:"):
        path = endpoint[len("unix:"):]
    else:
        path = endpoint
    if not path.startswith("/"):
        raise ValueError(f"endpoint: expected unix:///absolute/path.sock, got {endpoint!r}")
    return path

"""The operator's settings: one typed object, built in ``main()`` and passed to everything."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cistern.writecache import DEFAULT_MOUNT_ROOT

__all__ = ["OperatorSettings"]

DEFAULT_DAEMON_RESOURCES: dict[str, Any] = {
    "requests": {"cpu": "500m", "memory": "1Gi"},
    "limits": {"memory": "8Gi"},
}


@dataclass(frozen=True)
class OperatorSettings:
    """What the operator needs to know that is not in a WriteCache."""

    daemon_image: str = "ghcr.io/cistern-dev/cistern:0.1.0"
    """Image of the node daemon (the one Cistern image; entry point ``cistern-node``)."""
    daemon_image_pull_policy: str = "IfNotPresent"
    """Pull policy of the daemon image."""
    guard_image: str = "registry.k8s.io/pause:3.10"
    """Image of the drain-guard pods (they only sleep; the eviction API does the holding)."""
    mount_root: str = DEFAULT_MOUNT_ROOT
    """Host directory under which each WriteCache's FUSE mount lives (shared with the CSI node
    plugin, which looks for ``<mount_root>/<name>``)."""
    fuse_holder_dir: str | None = None
    """Host directory of the FUSE holder's socket (``holder.sock``; the chart runs the holder
    in the CSI node plugin pods): the daemons hand their FUSE connections to it, so a restart
    or an update of a cache daemon pod pauses the mounts instead of breaking them
    (docs/restarts.md). None: no holder."""
    control_port: int = 9464
    """Port of the daemons' control API on the pod network."""
    status_interval: float = 15.0
    """Seconds between status polls of the daemons (and drain progress checks)."""
    http_timeout: float = 5.0
    """Seconds a call to a daemon's control API may take."""
    daemon_resources: dict[str, Any] = field(
        default_factory=lambda: {k: dict(v) for k, v in DEFAULT_DAEMON_RESOURCES.items()})
    """Container resources of a daemon when the WriteCache sets none."""
    priority_class_name: str | None = "system-node-critical"
    """Priority class of the daemon pods (they back running training jobs); None: none."""
    check_object_store: bool = True
    """Probe the bucket with the WriteCache's credentials before rolling out a spec."""
    retry_delay: float = 30.0
    """Seconds before a spec that could not be rolled out (missing Secret, unreachable bucket)
    is tried again."""
    finalizer_poll: float = 5.0
    """Seconds between checks while a deletion waits for the nodes to drain."""
    workload_namespace: str = "cistern-system"
    """The operator's own namespace (the chart's): where the privileged daemons, their
    configuration, control tokens, the copies of credentials and the access ConfigMap live.
    Never a tenant's namespace."""
    allowed_node_selector_keys: tuple[str, ...] | None = None
    """Node label keys a WriteCache's ``nodeSelector`` may use; None: any (the chart always
    sets a list)."""
    forbid_control_plane: bool = True
    """Refuse node selectors and tolerations aimed at control-plane nodes, and keep the
    daemons off them with a node affinity."""
    max_drain_timeout: float = 24 * 3600.0
    """Upper bound of a WriteCache's ``drain.timeout``: a drain guard never holds a node longer."""
    finalizer_timeout: float = 3600.0
    """Seconds a deletion waits for unreachable or dirty daemons beyond the drain timeout
    before it gives up (Degraded, an Event naming the abandon annotation), keeping the data."""
    finalizer_gave_up_poll: float = 60.0
    """Seconds between checks of a deletion that gave up (it still notices the abandon
    annotation, or daemons that came back and flushed)."""

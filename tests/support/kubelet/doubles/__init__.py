"""Stand-ins for third-party sidecar images, run as processes with the real images' flags.

An image hard-codes some container paths (the registrar writes into ``/registration``); the
pod runner passes the container's mounts in ``POD_RUNNER_MOUNTS`` so a double finds them.
"""

from __future__ import annotations

import json
import os

__all__ = ["container_path"]


def container_path(path: str) -> str:
    """Where ``path`` (as the container sees it) lies on this machine."""
    mounts = json.loads(os.environ.get("POD_RUNNER_MOUNTS", "{}"))
    for mount in sorted(mounts, key=len, reverse=True):
        base = mount.rstrip("/")
        if path == base or path.startswith(base + "/"):
            return str(mounts[mount]) + path[len(base):]
    return path

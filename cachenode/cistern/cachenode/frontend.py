"""FUSE front ends: thin adapters from kernel requests to ``CacheCore`` calls.

A front end mounts the file system, serves requests until ``request_stop()`` (from any thread)
or an external unmount, and unmounts in ``close()``. ``select_frontend`` picks one for
``--fuse-frontend auto|passthrough|pyfuse3``.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Protocol

from cistern.cachenode.core import CacheCore

__all__ = ["FrontendUnavailable", "FuseFrontend", "is_mountpoint", "select_frontend"]

log = logging.getLogger(__name__)


class FrontendUnavailable(RuntimeError):
    """The requested front end cannot run on this kernel or with these privileges."""


class FuseFrontend(Protocol):
    name: str

    def mount(self, core: CacheCore, mountpoint: str, *, allow_other: bool,
              fsname: str) -> None: ...

    def serve(self) -> None: ...

    def request_stop(self) -> None: ...

    def close(self) -> None: ...

    def status(self) -> dict[str, Any]:
        """What /status reports under ``fuse`` (and /metrics as cistern_fuse_*)."""
        ...


def is_mountpoint(path: str) -> bool:
    real = os.path.realpath(path)
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 4 and fields[4].replace("\\040", " ") == real:
                    return True
    except OSError:
        return os.path.ismount(real)
    return False


def select_frontend(choice: str) -> FuseFrontend:
    """Return the front end for ``choice``; ``auto`` prefers kernel passthrough when offered."""
    if choice in ("auto", "passthrough"):
        try:
            from cistern.cachenode import fuse_passthrough
        except ImportError as exc:
            if choice == "passthrough":
                raise FrontendUnavailable(f"passthrough front end not available: {exc}") from exc
            log.info("FUSE passthrough front end not built in; using pyfuse3")
        else:
            ok, reason = fuse_passthrough.probe_passthrough()
            if ok:
                return fuse_passthrough.PassthroughFrontend()
            if choice == "passthrough":
                raise FrontendUnavailable(f"FUSE passthrough is not available: {reason}")
            log.info("FUSE passthrough not available (%s); using pyfuse3", reason)
    from cistern.cachenode.fuse_pyfuse3 import Pyfuse3Frontend

    return Pyfuse3Frontend()

"""FUSE front ends: thin adapters from kernel requests to ``CacheCore`` calls.

A front end mounts the file system, serves requests until ``request_stop()`` (from any thread)
or an external unmount, and unmounts in ``close()``. ``select_frontend`` picks one for
``--fuse-frontend auto|passthrough|pyfuse3``. With a FUSE holder (``holder.py``),
``claim_held`` and ``attach_frontend`` hand the connection to the holder after mounting, or
take over the one it holds instead of mounting.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Protocol

from cistern.cachenode.core import CacheCore
from cistern.cachenode.holder import Held, HolderClient

__all__ = ["FrontendUnavailable", "FuseFrontend", "attach_frontend", "claim_held",
           "is_mountpoint", "select_frontend"]

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


def select_frontend(choice: str, *, takeover: bool = False) -> FuseFrontend:
    """Return the front end for ``choice``; ``auto`` prefers kernel passthrough when offered.

    ``takeover``: a holder keeps a connection for the mount point; only the kernel-protocol
    front end can serve a connection it did not mount (libfuse insists on answering INIT).
    """
    if takeover:
        if choice == "pyfuse3":
            raise FrontendUnavailable(
                "the FUSE holder keeps a live connection for this mount point, and the pyfuse3 "
                "front end cannot serve a connection it did not mount (libfuse must see INIT); "
                "use --fuse-frontend auto or passthrough")
        from cistern.cachenode.fuse_passthrough import PassthroughFrontend

        return PassthroughFrontend()
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


def claim_held(socket_path: str, mountpoint: str) -> tuple[HolderClient, Held | None]:
    """Connect to the FUSE holder; take the connection it keeps for ``mountpoint``, if any.

    Raises ``HolderError`` when the holder cannot be reached or another daemon serves it.
    """
    client = HolderClient(socket_path)
    try:
        return client, client.claim(mountpoint)
    except BaseException:
        client.close()
        raise


def attach_frontend(frontend: FuseFrontend, core: CacheCore, mountpoint: str, *,
                    allow_other: bool, fsname: str, holder: HolderClient | None,
                    held: Held | None) -> None:
    """Mount (handing the connection to ``holder`` if there is one) or take over ``held``."""
    from cistern.cachenode.fuse_passthrough import PassthroughFrontend

    if held is not None:
        assert isinstance(frontend, PassthroughFrontend)
        frontend.adopt(core, mountpoint, held.devfd, held.session_fd,
                       detached_at=held.claimed_at - held.detached_for)
    else:
        frontend.mount(core, mountpoint, allow_other=allow_other, fsname=fsname)
        if holder is not None:
            if isinstance(frontend, PassthroughFrontend):
                holder.hold(mountpoint, *frontend.handoff_fds())
                frontend.held = True
            else:
                log.warning("the %s front end cannot hand its FUSE connection to the holder "
                            "(libfuse keeps the connection state to itself): %s ends with "
                            "this daemon", frontend.name, mountpoint)
    if holder is not None:
        holder.keep_holding()

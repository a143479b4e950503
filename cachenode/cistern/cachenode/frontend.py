"""FUSE front ends: thin adapters from kernel requests to ``CacheCore`` calls.

A front end mounts the file system, serves requests until ``request_stop()`` (from any thread)
or an external unmount, and unmounts in ``close()``. ``select_frontend`` picks one for
``--fuse-frontend auto|passthrough|splice|pyfuse3`` and says why. With a FUSE holder
(``holder.py``), ``claim_held`` and ``attach_frontend`` hand the connection to the holder after
mounting, or take over the one it holds instead of mounting.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Protocol

from cistern.cachenode.core import CacheCore
from cistern.cachenode.fuse_passthrough import PassthroughFrontend, probe_passthrough
from cistern.cachenode.fuse_session import SessionFile
from cistern.cachenode.fuse_splice import SpliceFrontend
from cistern.cachenode.holder import Held, HolderClient
from cistern.cachenode.kernel_frontend import KernelFrontend

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


def select_frontend(choice: str, *, held_session: int | None = None
                    ) -> tuple[FuseFrontend, str]:
    """The front end for ``choice`` and why it was chosen (for /status).

    ``auto`` prefers kernel passthrough where the kernel offers it (``probe_passthrough``),
    else the splice front end (write-back cache + splice, docs/dev/splice.md); ``pyfuse3``
    stays selectable. ``held_session``: a holder keeps a connection for the mount point (its
    session file): only the /dev/fuse front end that negotiated it can serve it (libfuse
    insists on answering INIT itself, and what INIT settled cannot change).
    """
    if held_session is not None:
        if choice == "pyfuse3":
            raise FrontendUnavailable(
                "the FUSE holder keeps a live connection for this mount point, and the pyfuse3 "
                "front end cannot serve a connection it did not mount (libfuse must see INIT); "
                "use --fuse-frontend auto, passthrough or splice")
        try:
            init = SessionFile.read_init(held_session)
        except (OSError, ValueError) as exc:
            raise FrontendUnavailable(f"the session file of the held connection: {exc}") from exc
        held = "passthrough" if init.passthrough else "splice"
        if choice not in ("auto", held):
            log.warning("--fuse-frontend %s asked for, but the held connection was negotiated "
                        "for the %s front end: serving it with that one", choice, held)
        return _make(held), f"took over a held connection negotiated for {held}"
    if choice == "pyfuse3":
        return _make(choice), "asked for (--fuse-frontend pyfuse3)"
    if choice == "splice":
        return _make(choice), "asked for (--fuse-frontend splice)"
    ok, reason = probe_passthrough()
    if ok:
        return _make("passthrough"), ("asked for (--fuse-frontend passthrough)"
                                      if choice == "passthrough" else
                                      "auto: the kernel offers FUSE passthrough")
    if choice == "passthrough":
        raise FrontendUnavailable(f"FUSE passthrough is not available: {reason}")
    log.info("FUSE passthrough not available (%s); using the splice front end", reason)
    return _make("splice"), f"auto: no FUSE passthrough ({reason})"


def _make(name: str) -> FuseFrontend:
    if name == "passthrough":
        return PassthroughFrontend()
    if name == "splice":
        return SpliceFrontend()
    from cistern.cachenode.fuse_pyfuse3 import Pyfuse3Frontend  # imports pyfuse3 and trio

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
    if held is not None:
        assert isinstance(frontend, KernelFrontend)
        frontend.adopt(core, mountpoint, held.devfd, held.session_fd,
                       detached_at=held.claimed_at - held.detached_for)
    else:
        frontend.mount(core, mountpoint, allow_other=allow_other, fsname=fsname)
        if holder is not None:
            if isinstance(frontend, KernelFrontend):
                holder.hold(mountpoint, *frontend.handoff_fds())
                frontend.held = True
            else:
                log.warning("the %s front end cannot hand its FUSE connection to the holder "
                            "(libfuse keeps the connection state to itself): %s ends with "
                            "this daemon", frontend.name, mountpoint)
    if holder is not None:
        holder.keep_holding()

"""The FUSE connection holder: keeps /dev/fuse open while cache daemons come and go.

A FUSE mount lives as long as *some* process holds its /dev/fuse file open. The daemon
mounts, then hands the /dev/fuse file and its session file (``fuse_session.py``) to the
holder over a unix socket (SCM_RIGHTS) and keeps that socket connected while it runs. When
the daemon dies (``kill -9``, OOM, an upgrade), the kernel keeps the connection because the
holder still holds the file: applications see a pause, not ``ENOTCONN``. The next daemon
asks the holder for the files of its mount point and serves the same connection.

Protocol (SOCK_SEQPACKET, one JSON object per message, files as SCM_RIGHTS):

* ``{"op": "hold", "mount": M}`` + [devfd, sessionfd] -> ``{"ok": true}``: the sender now
  owns the connection of ``M``.
* ``{"op": "claim", "mount": M}`` -> ``{"ok": true, "held": false}``, or ``{"ok": true,
  "held": true, "detachedFor": seconds}`` + [devfd, sessionfd], after which the sender owns
  it; ``{"ok": false, "error": ...}`` while another live daemon owns it.
* ``{"op": "list"}`` -> ``{"ok": true, "mounts": [...]}``.

The holder drops a connection when the kernel ends it (the mount was unmounted: poll(2)
reports POLLERR on the /dev/fuse file; it polls only connections no daemon serves, since a
poll on /dev/fuse is woken by every request). Only peers with the holder's own uid (or root) are
served. Stopping the holder ends the mounts that no daemon is serving at that moment; a
running daemon keeps its mount and hands it to the next holder it reaches.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import Any

__all__ = ["Held", "HolderClient", "HolderError", "HolderServer", "TakeoverError"]

log = logging.getLogger(__name__)

MAX_MESSAGE = 4096
_UCRED = struct.Struct("iII")


class HolderError(RuntimeError):
    """The holder refused a request or cannot be reached; the message says why."""


class TakeoverError(HolderError):
    """A held FUSE connection cannot be served by this daemon; the message says why."""


@dataclass
class _Connection:
    mount: str
    devfd: int
    session_fd: int
    owner: socket.socket | None
    detached_at: float | None = None
    held_since: float = 0.0


@dataclass(frozen=True)
class Held:
    """A connection handed to a new daemon."""

    devfd: int
    session_fd: int
    detached_for: float
    """Seconds between the previous daemon's end and this claim."""
    claimed_at: float
    """time.monotonic() of the claim in this process."""


class HolderServer:
    """``cistern-node holder``: serve hold/claim requests until ``stop()``."""

    def __init__(self, socket_path: str) -> None:
        self.socket_path = os.path.abspath(socket_path)
        self._held: dict[str, _Connection] = {}
        self._clients: dict[int, socket.socket] = {}
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._stop = threading.Event()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)
        os.makedirs(os.path.dirname(self.socket_path), exist_ok=True)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        old_umask = os.umask(0o177)
        try:
            self._listener.bind(self.socket_path)
        finally:
            os.umask(old_umask)
        self._listener.listen(16)

    def stop(self) -> None:
        """Safe from signal handlers."""
        self._stop.set()
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def serve_forever(self) -> None:
        log.info("holding FUSE connections for cache daemons at %s", self.socket_path)
        try:
            while not self._stop.is_set():
                self._poll_once()
        finally:
            self._close()

    def _poll_once(self) -> None:
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        poller.register(self._listener.fileno(), select.POLLIN)
        for fd in self._clients:
            poller.register(fd, select.POLLIN)
        by_devfd = {}
        for held in self._held.values():
            # Only while no daemon serves it (a daemon sees the end itself, then leaves): a
            # poll on /dev/fuse is woken by every request queued on the connection.
            if held.owner is None:
                poller.register(held.devfd, 0)  # POLLERR only: the kernel ended it
                by_devfd[held.devfd] = held
        for fd, events in poller.poll(5000):
            if fd == self._wake_r:
                with contextlib.suppress(OSError):
                    os.read(self._wake_r, 64)
            elif fd == self._listener.fileno():
                self._accept()
            elif fd in by_devfd:
                if events & (select.POLLERR | select.POLLHUP | select.POLLNVAL):
                    self._drop(by_devfd[fd], "the kernel ended the connection (unmounted)")
            elif fd in self._clients:
                self._client_ready(self._clients[fd])

    def _accept(self) -> None:
        try:
            conn, _ = self._listener.accept()
        except OSError:
            return
        pid, uid, _gid = _UCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                       _UCRED.size))
        if uid not in (0, os.getuid()):
            log.warning("refusing holder client pid %d with uid %d", pid, uid)
            conn.close()
            return
        self._clients[conn.fileno()] = conn

    def _client_ready(self, conn: socket.socket) -> None:
        try:
            data, fds, _flags, _ = socket.recv_fds(conn, MAX_MESSAGE, 2)
        except OSError:
            data, fds = b"", []
        if not data:
            self._disconnect(conn)
            return
        try:
            request = json.loads(data)
            reply, send = self._handle(conn, request, fds)
        except (ValueError, KeyError, TypeError) as exc:
            for fd in fds:
                os.close(fd)
            reply, send = {"ok": False, "error": f"bad request: {exc}"}, []
        try:
            socket.send_fds(conn, [json.dumps(reply).encode()], send)
        except OSError as exc:
            log.warning("answering a holder client failed: %s", exc)

    def _handle(self, conn: socket.socket, request: dict[str, Any],
                fds: list[int]) -> tuple[dict[str, Any], list[int]]:
        op = request["op"]
        if op == "list":
            now = time.monotonic()
            return {"ok": True, "mounts": [
                {"mount": h.mount, "served": h.owner is not None,
                 "detachedFor": None if h.detached_at is None else now - h.detached_at}
                for h in self._held.values()]}, []
        mount = os.path.abspath(str(request["mount"]))
        current = self._held.get(mount)
        if op == "hold":
            if len(fds) != 2:
                for fd in fds:
                    os.close(fd)
                return {"ok": False, "error": "hold needs the /dev/fuse and session files"}, []
            if current is not None:
                if current.owner is not None and current.owner is not conn:
                    for fd in fds:
                        os.close(fd)
                    return {"ok": False, "error": f"{mount} is held for another daemon"}, []
                self._drop(current, "replaced by a new connection")
            self._held[mount] = _Connection(mount, fds[0], fds[1], conn,
                                            held_since=time.monotonic())
            log.info("holding the FUSE connection of %s", mount)
            return {"ok": True}, []
        if op == "claim":
            for fd in fds:
                os.close(fd)
            if current is None:
                return {"ok": True, "held": False}, []
            if current.owner is not None and current.owner is not conn:
                return {"ok": False, "error": f"{mount} is served by a running daemon"}, []
            detached_for = 0.0 if current.detached_at is None else \
                time.monotonic() - current.detached_at
            current.owner = conn
            current.detached_at = None
            log.info("handing the FUSE connection of %s to a new daemon (%.3fs without one)",
                     mount, detached_for)
            return {"ok": True, "held": True, "detachedFor": detached_for}, \
                [current.devfd, current.session_fd]
        for fd in fds:
            os.close(fd)
        return {"ok": False, "error": f"unknown op {op!r}"}, []

    def _disconnect(self, conn: socket.socket) -> None:
        self._clients.pop(conn.fileno(), None)
        now = time.monotonic()
        for held in self._held.values():
            if held.owner is conn:
                held.owner = None
                held.detached_at = now
                log.warning("the daemon serving %s is gone; holding its FUSE connection "
                            "until the next one claims it", held.mount)
        conn.close()

    def _drop(self, held: _Connection, why: str) -> None:
        log.info("releasing the FUSE connection of %s: %s", held.mount, why)
        self._held.pop(held.mount, None)
        os.close(held.devfd)
        os.close(held.session_fd)

    def _close(self) -> None:
        for held in list(self._held.values()):
            self._drop(held, "the holder stops")
        for conn in self._clients.values():
            conn.close()
        self._clients.clear()
        self._listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)
        os.close(self._wake_r)
        os.close(self._wake_w)


class HolderClient:
    """A daemon's connection to the holder. It stays open while the daemon runs: its
    closing (the daemon's death included) is how the holder learns the daemon is gone.
    If the holder restarts, ``keep_holding`` hands the connection to the new one.
    """

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self._sock = self._connect()
        self._hold: tuple[str, int, int] | None = None
        self._closed = False

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            sock.connect(self.socket_path)
        except OSError as exc:
            sock.close()
            raise HolderError(f"no FUSE holder answers at {self.socket_path}: "
                              f"{exc.strerror or exc}") from exc
        return sock

    def _call(self, request: dict[str, Any], fds: list[int] | None = None
              ) -> tuple[dict[str, Any], list[int]]:
        socket.send_fds(self._sock, [json.dumps(request).encode()], fds or [])
        data, got, _flags, _ = socket.recv_fds(self._sock, MAX_MESSAGE, 2)
        if not data:
            raise HolderError(f"the FUSE holder at {self.socket_path} closed the connection")
        reply = json.loads(data)
        if not reply.get("ok"):
            for fd in got:
                os.close(fd)
            raise HolderError(f"FUSE holder: {reply.get('error')}")
        return reply, got

    def claim(self, mount: str) -> Held | None:
        """The connection the holder keeps for ``mount``, or None when it has none."""
        reply, fds = self._call({"op": "claim", "mount": os.path.abspath(mount)})
        if not reply.get("held"):
            return None
        if len(fds) != 2:
            for fd in fds:
                os.close(fd)
            raise HolderError("FUSE holder sent a held connection without its files")
        return Held(fds[0], fds[1], float(reply.get("detachedFor") or 0.0), time.monotonic())

    def hold(self, mount: str, devfd: int, session_fd: int) -> None:
        """Give the holder a copy of the connection's files (ours stay open)."""
        mount = os.path.abspath(mount)
        self._call({"op": "hold", "mount": mount}, [devfd, session_fd])
        self._hold = (mount, devfd, session_fd)

    def keep_holding(self) -> None:
        """Start a thread that hands our connection to a restarted holder."""
        threading.Thread(target=self._watch, name="fuse-holder", daemon=True).start()

    def _watch(self) -> None:
        while not self._closed:
            try:
                data = self._sock.recv(MAX_MESSAGE)
            except OSError:
                data = b""
            if self._closed:
                return
            if data:
                continue
            log.warning("lost the FUSE holder at %s; reconnecting", self.socket_path)
            while not self._closed:
                try:
                    self._sock.close()
                    self._sock = self._connect()
                    if self._hold is not None:
                        self.hold(*self._hold)
                    log.info("the FUSE holder at %s holds our connection again",
                             self.socket_path)
                    break
                except (HolderError, OSError) as exc:
                    log.debug("holder not back yet: %s", exc)
                    time.sleep(1.0)

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()

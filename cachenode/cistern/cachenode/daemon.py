"""The node daemon: wires store, core, flusher, control API and a FUSE front end together."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from cistern.cachenode.control import ControlServer
from cistern.cachenode.core import CacheCore
from cistern.cachenode.flusher import Flusher
from cistern.cachenode.frontend import (
    FrontendUnavailable,
    FuseFrontend,
    attach_frontend,
    claim_held,
    is_mountpoint,
    select_frontend,
)
from cistern.cachenode.holder import Held, HolderClient, HolderError
from cistern.cachenode.metrics import Metrics
from cistern.cachenode.peers.node import PeerNode, PeerSetupError
from cistern.cachenode.s3api import S3Endpoint, load_credential
from cistern.cachenode.s3store import open_store
from cistern.cachenode.store import StoreError
from cistern.cachenode.storeclient import StoreClient
from cistern.config import NodeConfig, parse_hostport
from cistern.nodestatus import (
    CheckpointProgress,
    DrainProgress,
    FuseStatus,
    NodeStatus,
    StoreErrorReport,
)

__all__ = ["NodeDaemon", "StartupError"]

log = logging.getLogger(__name__)


class StartupError(Exception):
    """The daemon cannot start; the message says why in one line."""


def _detach_dead_mount(path: str) -> None:
    """A daemon killed with -9 leaves its FUSE mount behind ("Transport endpoint is not
    connected"); detach it so a restart at the same place works."""
    try:
        os.stat(path)
        return
    except OSError as exc:
        if exc.errno != errno.ENOTCONN or not is_mountpoint(path):
            return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.umount2(path.encode(), 2) != 0:  # MNT_DETACH
        code = ctypes.get_errno()
        raise StartupError(f"mount point {path} holds a dead FUSE mount that cannot be "
                           f"detached: {os.strerror(code)}")
    log.warning("detached the dead FUSE mount left at %s by a previous run", path)


def _check_mountpoint(path: str) -> None:
    _detach_dead_mount(path)
    if not os.path.exists(path):
        raise StartupError(f"mount point {path} does not exist (create it first)")
    if not os.path.isdir(path):
        raise StartupError(f"mount point {path} is not a directory")
    if is_mountpoint(path):
        raise StartupError(f"mount point {path} is already a mount point (is another "
                           "cistern-node running? unmount it with: fusermount3 -u PATH)")
    if os.listdir(path):
        raise StartupError(f"mount point {path} is not empty")


def _check_cache_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-probe"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise StartupError(f"cache dir {path} is not writable: "
                           f"{exc.strerror or exc}") from exc


class NodeDaemon:
    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.state = "starting"
        self.prom = Metrics()
        self.frontend: FuseFrontend | None = None
        self.frontend_reason = ""  # why this front end runs (/status fuse.reason)
        self.core: CacheCore | None = None
        self.flusher: Flusher | None = None
        self.control: ControlServer | None = None
        self.s3_endpoint: S3Endpoint | None = None
        self.peers: PeerNode | None = None
        self._lock_fd = -1
        self._holder: HolderClient | None = None
        self._drain_started: float | None = None
        self._drain_bytes_at_start = 0
        self._stopping = threading.Event()
        self._started = time.time()

    # ---------------------------------------------------------------- start-up

    def prepare(self) -> None:
        """Validate everything that can be validated before mounting; raise StartupError."""
        cfg = self.config
        mount = os.path.abspath(cfg.mount)
        held: Held | None = None
        if cfg.fuse_holder:  # a held connection is live: never stat it before serving it
            try:
                self._holder, held = claim_held(cfg.fuse_holder, mount)
            except HolderError as exc:
                raise StartupError(str(exc)) from exc
        if held is None:
            _check_mountpoint(mount)
        cache_dir = Path(cfg.cache.dir).absolute()
        _check_cache_dir(cache_dir)
        self._lock_fd = os.open(cache_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StartupError(f"cache dir {cache_dir} is in use by another cistern-node") \
                from None
        # One connection per file upload (PUT, or a stream's create/complete), one per part
        # in flight, and a few for the read path.
        store = open_store(cfg.store, max_pool=cfg.flush.max_concurrent_uploads
                           + cfg.flush.max_concurrent_parts + 4)
        if cfg.peers.listen:  # issue 17: peer copies and peer reads (docs/dev/peers.md)
            try:
                self.peers = PeerNode(cfg, cache_dir)
            except PeerSetupError as exc:
                raise StartupError(str(exc)) from exc
            store = self.peers.overlay(store)
        # One client for the flusher and the read path: one rate limit, one set of metrics.
        client = StoreClient(store, cfg.flush, self.prom)
        try:
            # Throttling or a blip at start-up is retried; a missing bucket is not.
            client.check()
        except StoreError as exc:
            if held is None:
                raise StartupError(f"object store {store.description}: {exc}") from exc
            # Applications wait on the held mount: serve it; uploads retry until S3 is back.
            log.error("object store %s: %s; serving the held mount anyway", store.description,
                      exc)
        token = None
        if cfg.control_token_file:
            try:
                token = Path(cfg.control_token_file).read_text().strip()
            except OSError as exc:
                raise StartupError(f"control token file {cfg.control_token_file}: "
                                   f"{exc.strerror}") from exc
            if not token:  # an empty token would accept "Bearer "
                raise StartupError(f"control token file {cfg.control_token_file} is empty")
        host, port = parse_hostport(cfg.control, "control")
        try:
            self.control = ControlServer(self, host, port, token)
        except OSError as exc:
            raise StartupError(f"control address {cfg.control}: {exc.strerror}") from exc
        except ValueError as exc:  # a non-loopback address without a token
            raise StartupError(str(exc)) from exc
        try:
            self.frontend, self.frontend_reason = select_frontend(
                cfg.fuse_frontend, held_session=held.session_fd if held is not None else None)
        except FrontendUnavailable as exc:
            raise StartupError(str(exc)) from exc
        self.prom.set_frontend(self.frontend.name)
        try:
            self.core = CacheCore(cache_dir, client, flush=cfg.flush, cache=cfg.cache,
                                  drain=cfg.drain,
                                  store_keep_last=cfg.store.keep_last_checkpoints,
                                  on_event=self.prom.event,
                                  replication=self.peers.replication if self.peers else None)
        except OSError as exc:  # e.g. capacityBytes larger than the cache file system
            raise StartupError(f"cache dir {cache_dir}: {exc.strerror or exc}") from exc
        self.flusher = Flusher(self.core, client, cfg.flush)
        self.prom.watch_state(self.node_status)
        self._prepare_s3_endpoint(self.core, cache_dir)
        try:
            attach_frontend(self.frontend, self.core, mount, allow_other=cfg.allow_other,
                            fsname=f"cistern:{cfg.store.url}", holder=self._holder, held=held)
        except HolderError as exc:
            self.core.close()
            raise StartupError(f"FUSE holder, mount point {mount}: {exc}") from exc
        except Exception as exc:
            self.core.close()
            raise StartupError(f"cannot mount FUSE at {mount}: {exc}") from exc

    def _prepare_s3_endpoint(self, core: CacheCore, cache_dir: Path) -> None:
        """The S3-compatible endpoint over the same namespace, when configured (s3api/)."""
        cfg = self.config.s3_endpoint
        if not cfg.enabled:
            return
        assert cfg.credentials_dir is not None  # enforced by the config
        try:
            credential = load_credential(cfg.credentials_dir)
        except (OSError, ValueError) as exc:
            core.close()
            raise StartupError(f"s3Endpoint credentials in {cfg.credentials_dir}: "
                               f"{getattr(exc, 'strerror', None) or exc}") from exc
        self.s3_endpoint = S3Endpoint(core, bucket=cfg.bucket or self.config.store.bucket
                                      or "cistern", credential=credential,
                                      state_dir=cache_dir / "s3api", listen=cfg.listen,
                                      socket=cfg.socket)
        self.s3_endpoint.recover()  # before the flusher runs: crash leftovers never upload

    def run(self) -> int:
        """Serve until stopped; return the process exit code."""
        assert self.frontend and self.core and self.flusher and self.control
        self.flusher.start()
        self.control.start()
        if self.peers is not None:
            self.peers.start(self.core, self.flusher.client, self.config.flush.is_commit_marker)
        if self.s3_endpoint is not None:
            try:
                self.s3_endpoint.start()
            except Exception as exc:
                print(f"cistern-node: error: cannot start the S3 endpoint: {exc}", flush=True)
                self.s3_endpoint = None
                self._shutdown()
                return 1
        threading.Thread(target=self._maintain, name="maintenance", daemon=True).start()
        threading.Thread(target=self._keep_spares, name="spares", daemon=True).start()
        self.state = "running"
        signal.signal(signal.SIGINT, self._on_sigint)
        signal.signal(signal.SIGTERM, self._on_sigterm)
        log.info("serving %s at %s (front end %s, cache %s); status: %s/status",
                 self.config.store.url, os.path.abspath(self.config.mount), self.frontend.name,
                 self.config.cache.dir, self.control.url)
        print(f"cistern-node: mounted {self.config.store.url} at "
              f"{os.path.abspath(self.config.mount)}; status: {self.control.url}/status",
              flush=True)
        try:
            self.frontend.serve()
        finally:
            self._shutdown()
        return 0

    def _maintain(self) -> None:
        """Eviction, TTL and retention, once a second, until shutdown."""
        assert self.core
        while not self._stopping.wait(1.0):
            try:
                self.core.maintain()
            except Exception:  # housekeeping must never take the daemon down
                log.exception("cache maintenance failed")

    def _keep_spares(self) -> None:
        """Keep empty data files ready so that creating a file skips the file system create;
        and move new files' journal rows from the intent log into SQLite in batches."""
        assert self.core
        while not self._stopping.is_set():
            woken = self.core.spares_wanted.wait(1.0)
            try:  # about every 32 creates in a burst, else once a second
                self.core.apply_journal_intents()
            except Exception:  # kept in the log and applied before any other journal write
                log.exception("applying the journal's intent log failed")
            if not woken:
                continue
            try:
                self.core.make_spares()
            except OSError as exc:  # e.g. a full cache disk: creates then fail and say so
                log.warning("could not prepare spare data files: %s", exc)
                self._stopping.wait(5.0)

    def _shutdown(self) -> None:
        self.state = "stopping"
        self._stopping.set()
        assert self.frontend and self.core and self.flusher and self.control
        if self.s3_endpoint is not None:
            self.s3_endpoint.stop()
        self.frontend.close()
        self.flusher.stop()
        self.control.stop()
        if self.peers is not None:
            self.peers.stop()
        self.core.close()
        if self._holder is not None:
            self._holder.close()
        left = self.core.dirty_bytes
        if left:
            log.info("stopped with %d dirty bytes journaled; they upload on the next start",
                     left)
        log.info("%s %s", "left to the FUSE holder:" if getattr(self.frontend, "held", False)
                 else "unmounted", os.path.abspath(self.config.mount))

    def _on_sigint(self, signum: int, frame: Any) -> None:
        log.info("interrupted: unmounting (dirty data stays journaled)")
        self._stop_now()

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        if getattr(self.frontend, "held", False):
            if self._drain_started is not None:
                # Asked to drain first (the WriteCache is being deleted, or the node drained):
                # this cache is going away, not being upgraded. Leaving the mount to the holder
                # would leave a mount nobody serves; unmounting ends the connection, and the
                # holder drops it when the kernel does.
                log.info("SIGTERM after a drain: unmounting instead of handing off")
                assert self.frontend is not None
                self.frontend.held = False  # type: ignore[attr-defined]
                self._stop_now()
                return
            # A restart or upgrade: no drain needed, the next daemon takes the connection over.
            log.info("SIGTERM: leaving the mount to the FUSE holder for the next daemon")
            self._stop_now()
            return
        if self._drain_started is not None or self._stopping.is_set():
            log.info("second SIGTERM: stopping now")
            self._stop_now()
            return
        log.info("SIGTERM: draining before exit (timeout %.0fs)", self.config.drain.timeout)
        threading.Thread(target=self._drain_then_stop, name="sigterm-drain", daemon=True).start()

    def _drain_then_stop(self) -> None:
        self.drain(0.0)
        assert self.flusher
        if self.flusher.wait_idle(self.config.drain.timeout):
            log.info("drained: exiting")
            self._stop_now()
        else:
            log.error("drain timed out with %d dirty bytes left; staying up so nothing is "
                      "lost (send SIGINT to stop anyway)", self.core.dirty_bytes if self.core
                      else -1)

    def _stop_now(self) -> None:
        self._stopping.set()
        if self.frontend is not None:
            threading.Thread(target=self.frontend.request_stop, daemon=True).start()

    # ---------------------------------------------------------------- control API

    def status(self) -> dict[str, Any]:
        """The /status JSON: ``node_status()`` serialised (the one place it is)."""
        return self.node_status().to_json()

    def node_status(self) -> NodeStatus:
        """The node's state from what the core, the flusher and the front end report."""
        core, flusher = self.core, self.flusher
        if core is None or flusher is None:
            return NodeStatus(state=self.state)
        summary = core.pending_summary()
        state = self.state
        if core.draining and state == "running":
            state = "drained" if core.idle() else "draining"
        drain = None
        if self._drain_started is not None:
            elapsed = time.monotonic() - self._drain_started
            done = max(0, self._drain_bytes_at_start - core.dirty_bytes)
            rate = done / elapsed if elapsed > 0 else 0.0
            drain = DrainProgress(
                started_seconds_ago=round(elapsed, 1),
                bytes_left=core.dirty_bytes,
                files_left=summary["dirty_files"],
                eta_seconds=round(core.dirty_bytes / rate, 1) if rate > 0 else None,
                timeout_seconds=self.config.drain.timeout,
                timed_out=elapsed > self.config.drain.timeout and not core.idle(),
                new_writes=self.config.drain.new_writes,
            )
        return NodeStatus(
            state=state,
            frontend=self.frontend.name if self.frontend else None,
            fuse=FuseStatus.from_json({**self.frontend.status(), "reason": self.frontend_reason})
            if self.frontend
            else FuseStatus(),
            mount=os.path.abspath(self.config.mount),
            store=self.config.store.url,
            dirty_bytes=core.dirty_bytes,
            dirty_files=summary["dirty_files"],
            uploading_files=summary["uploading_files"],
            open_writers=summary["open_writers"],
            pending_moves=summary["pending_moves"],
            pending_deletes=summary["pending_deletes"],
            clean_bytes=core.clean_bytes,
            uploaded_bytes_total=flusher.client.uploaded_bytes_total,
            uploaded_objects_total=flusher.uploaded_objects_total,
            conflicts_total=flusher.conflicts_total,
            last_conflict=flusher.last_conflict,
            last_conflict_time=flusher.last_conflict_time,
            last_flush_time=flusher.last_flush_time,
            errors=flusher.client.errors.total,
            recent_errors=tuple(StoreErrorReport.from_json(e)
                                for e in flusher.client.errors.recent),
            throttled=flusher.client.adaptive.throttled_now,
            upload_rate_limit_requests=float(flusher.client.request_bucket.rate or 0),
            capacity_bytes=core.capacity_bytes,
            mode=self.config.flush.mode,
            checkpoints=tuple(CheckpointProgress.from_json(c) for c in core.checkpoints()),
            uptime_seconds=round(time.time() - self._started, 1),
            drain=drain,
            s3_endpoint=self.s3_endpoint.status() if self.s3_endpoint is not None else None,
            peers=self.peers.status() if self.peers is not None else None,
        )

    def flush(self, timeout: float) -> bool:
        assert self.core and self.flusher
        seq = self.core.request_flush()
        return self.flusher.wait_idle(timeout, upto_seq=seq)

    def drain(self, wait: float) -> dict[str, Any]:
        assert self.core and self.flusher
        if self._drain_started is None:
            self._drain_started = time.monotonic()
            self._drain_bytes_at_start = self.core.dirty_bytes
            log.info("drain started: %d dirty bytes to evacuate", self.core.dirty_bytes)
        self.flusher.set_evacuation(True)
        self.core.set_draining(True)
        if wait > 0:
            self.flusher.wait_idle(wait)
        return self.status()

    def resume(self) -> dict[str, Any]:
        assert self.core and self.flusher
        self._drain_started = None
        self.core.set_draining(False)
        self.flusher.set_evacuation(False)
        log.info("drain cancelled: accepting writes again")
        return self.status()

    def metrics(self) -> bytes:
        return self.prom.render()

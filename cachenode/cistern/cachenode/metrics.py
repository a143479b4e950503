"""Prometheus metrics of one cache node (one registry per daemon, no globals)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from cistern.nodestatus import NodeStatus, PeersStatus

__all__ = ["THROTTLE_CODES", "Metrics"]

THROTTLE_CODES = frozenset({"SlowDown", "503", "Throttling", "ThrottlingException",
                            "RequestLimitExceeded", "ServiceUnavailable"})


class _StateCollector(Collector):
    """Gauges read from the node's typed status at scrape time."""

    def __init__(self, read: Callable[[], NodeStatus]) -> None:
        self._read = read

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        status = self._read()
        for name, value, doc in (
                ("dirty_bytes", status.dirty_bytes,
                 "Bytes written locally and not yet in the store"),
                ("dirty_files", status.dirty_files,
                 "Files written locally and not yet in the store"),
                ("uploading_files", status.uploading_files, "Files being uploaded now"),
                ("clean_bytes", status.clean_bytes,
                 "Bytes cached locally that the store also has"),
                ("pending_deletes", status.pending_deletes,
                 "Object deletions waiting for the flusher"),
                ("pending_moves", status.pending_moves, "Object renames waiting for the flusher"),
                ("capacity_bytes", status.capacity_bytes, "Bytes the cache may use"),
                ("upload_rate_limit_requests", status.upload_rate_limit_requests,
                 "Current adaptive request-rate limit (0: unlimited)")):
            yield GaugeMetricFamily(f"cistern_{name}", doc, value=float(value))
        fuse = status.fuse
        for count, name, doc in (
                (fuse.requests, "cistern_fuse_requests", "FUSE requests read from the kernel"),
                (fuse.errors, "cistern_fuse_eio_replies",
                 "FUSE requests answered EIO (lost data or a bug; ordinary errnos not counted)"),
                (fuse.passthrough_opens, "cistern_fuse_passthrough_opens",
                 "Opens served by kernel passthrough to the local data file"),
                (fuse.direct_io_opens, "cistern_fuse_direct_io_opens",
                 "Opens served by the daemon (data not local yet, or no backing file)"),
                (fuse.takeovers, "cistern_fuse_takeovers",
                 "Daemons that took this FUSE connection over from a dead one (holder)"),
                (fuse.resent_requests, "cistern_fuse_resent_requests",
                 "Requests the kernel sent again after a takeover (FUSE_NOTIFY_RESEND)")):
            if count is not None:
                yield CounterMetricFamily(name, doc, value=float(count))
        if fuse.last_takeover_pause_seconds is not None:
            yield GaugeMetricFamily("cistern_fuse_last_takeover_pause_seconds",
                                    "Seconds the mount went without a daemon before the last "
                                    "takeover", value=fuse.last_takeover_pause_seconds)
        if fuse.open_backing_files is not None:
            yield GaugeMetricFamily("cistern_fuse_open_backing_files",
                                    "Backing files registered with the kernel now",
                                    value=float(fuse.open_backing_files))
        yield GaugeMetricFamily("cistern_draining", "1 while the node drains",
                                value=1.0 if status.draining else 0.0)
        if status.peers is not None:  # issue 17
            yield from _peer_metrics(status.peers)


def _peer_metrics(peers: PeersStatus) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
    transport = GaugeMetricFamily("cistern_peer_transport_info",
                                  "Transport of peer traffic, and why (e.g. why not RDMA)",
                                  labels=["transport", "reason"])
    transport.add_metric([peers.transport, peers.transport_reason], 1.0)
    yield transport
    for name, value, doc in (
            ("peer_bytes_held", peers.bytes_held_for_peers, "Bytes of copies held for peers"),
            ("peer_copies_held", peers.copies_held_for_peers, "Copies held for peers"),
            ("peer_members", len(peers.members), "Other members of the WriteCache"),
            ("peer_suspects", len(peers.suspects), "Members skipped after a missed deadline"),
            ("peer_copies_conflicting", peers.copies_conflicting,
             "Copies of dead peers not uploaded: another version is in the store")):
        yield GaugeMetricFamily(f"cistern_{name}", doc, value=float(value))
    for name, value, doc in (
            ("peer_copies_sent", peers.copies_sent_total, "Copies acknowledged by peers"),
            ("peer_copies_missing", peers.copies_missing_total,
             "fsyncs that got fewer peer copies than asked (degraded or failed)"),
            ("peer_read_bytes", peers.peer_read_bytes_total, "Bytes read from peers"),
            ("peer_rescued_uploads", peers.rescued_uploads_total,
             "Objects uploaded for a dead peer")):
        yield CounterMetricFamily(f"cistern_{name}", doc, value=float(value))


class Metrics:
    def __init__(self, frontend: str = "unknown") -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.uploaded_bytes = Counter("cistern_uploaded_bytes", "Bytes uploaded to the store",
                                      registry=r)
        self.uploaded_objects = Counter("cistern_uploaded_objects",
                                        "Objects uploaded to the store", registry=r)
        self.upload_seconds = Histogram(
            "cistern_upload_seconds", "Time to upload one file (all retries included)",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300), registry=r)
        self.requests = Counter("cistern_s3_requests", "Object-store requests by operation",
                                ["op"], registry=r)
        self.errors = Counter("cistern_s3_errors", "Object-store errors by code", ["code"],
                              registry=r)
        self.throttles = Counter("cistern_s3_throttles",
                                 "Requests the store throttled (503 SlowDown and alike)",
                                 registry=r)
        self.copies = Counter("cistern_renamed_objects",
                              "Server-side copies done for renames of uploaded files", registry=r)
        self.deletes = Counter("cistern_deleted_objects", "Objects deleted from the store",
                               registry=r)
        self.backpressure_seconds = Counter("cistern_backpressure_seconds",
                                            "Time writers were held waiting for space",
                                            registry=r)
        self.admission_refusals = Counter("cistern_admission_refusals",
                                          "Creates or writes refused for lack of space",
                                          registry=r)
        self.evictions = Counter("cistern_evictions", "Clean files dropped from the local cache",
                                 ["reason"], registry=r)
        self.evicted_bytes = Counter("cistern_evicted_bytes",
                                     "Clean bytes dropped from the local cache", registry=r)
        self.hit_bytes = Counter("cistern_cache_hit_bytes",
                                 "Bytes of files opened that were already local", registry=r)
        self.miss_bytes = Counter("cistern_cache_miss_bytes",
                                  "Bytes fetched from the store on open", registry=r)
        self.retention_deletions = Counter("cistern_retention_deletions",
                                           "Checkpoints removed by retention", ["where"],
                                           registry=r)
        self.data_loss = Counter("cistern_data_loss",
                                 "Files whose local data could not be recovered", registry=r)
        self.recovery_events = Counter(
            "cistern_durability_events",
            "unsynced_kept: after a power loss, a file's unsynced local data was set aside "
            "(lost+found) and the store's version kept; journal_error: an upload result "
            "could not be journaled (it is retried)", ["kind"], registry=r)
        self.conflicts = Counter("cistern_conflicts",
                                 "Uploads refused because another writer had replaced the "
                                 "object; this node's version kept under a conflict name",
                                 registry=r)
        self.rate_limited_seconds = Counter("cistern_rate_limited_seconds",
                                            "Time uploads waited for the rate limiter",
                                            registry=r)
        self.frontend = Gauge("cistern_fuse_frontend", "FUSE front end in use", ["frontend"],
                              registry=r)
        self.frontend.labels(frontend).set(1)

    def set_frontend(self, name: str) -> None:
        self.frontend.clear()
        self.frontend.labels(name).set(1)

    def watch_state(self, read: Callable[[], NodeStatus]) -> None:
        self.registry.register(_StateCollector(read))

    def event(self, name: str, value: float) -> None:
        """Counters fed by the core, which knows nothing of Prometheus."""
        kind, _, label = name.partition(":")
        if kind == "data_loss":
            self.data_loss.inc(value)
        elif kind in ("unsynced_kept", "journal_error"):
            self.recovery_events.labels(kind).inc(value)
        elif kind == "fetched_bytes":
            self.miss_bytes.inc(value)
        elif kind == "hit_bytes":
            self.hit_bytes.inc(value)
        elif kind == "backpressure_seconds":
            self.backpressure_seconds.inc(value)
        elif kind == "admission_refused":
            self.admission_refusals.inc(value)
        elif kind == "evicted":
            self.evictions.labels(label).inc()
            self.evicted_bytes.inc(value)
        elif kind == "retention":
            self.retention_deletions.labels(label).inc(value)
        elif kind == "store_error":
            self.errors.labels(label).inc(value)
            if label in THROTTLE_CODES:
                self.throttles.inc(value)

    def render(self) -> bytes:
        return generate_latest(self.registry)

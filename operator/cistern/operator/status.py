"""Pure status logic: per-node summaries, totals and the WriteCache's conditions."""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cistern.nodestatus import NodeStatus

__all__ = [
    "BACKLOG_FRACTION",
    "ClusterView",
    "SpecProblem",
    "build_conditions",
    "human_bytes",
    "node_summary",
    "now_iso",
    "parse_time",
    "totals",
]

#: A node whose dirty bytes exceed this share of its cache capacity has a flush backlog.
BACKLOG_FRACTION = 0.5


@dataclass(frozen=True)
class SpecProblem:
    """Why the latest spec was not rolled out (the previous one keeps running)."""

    reason: str
    message: str


@dataclass(frozen=True)
class ClusterView:
    """What the operator observed about one WriteCache at one moment."""

    generation: int
    spec_problem: SpecProblem | None = None
    daemonset: Mapping[str, Any] | None = None
    nodes: Sequence[Mapping[str, Any]] = field(default_factory=list)
    """Per-node summaries as built by ``node_summary``."""


def now_iso() -> str:
    """The time stamps of status fields and conditions (UTC, seconds)."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: str) -> datetime.datetime:
    """A ``now_iso`` time stamp back."""
    return datetime.datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC)


def human_bytes(value: int | float) -> str:
    """1536 -> '1.5Ki'; the Dirty printer column."""
    amount = float(value)
    for unit in ("", "Ki", "Mi", "Gi", "Ti"):
        if abs(amount) < 1024 or unit == "Ti":
            return f"{amount:.0f}{unit}" if unit == "" or amount >= 100 else \
                f"{amount:.1f}{unit}".replace(".0", "")
        amount /= 1024
    return f"{amount:.1f}Ti"


def _int(value: Any) -> int:
    if isinstance(value, bool):
        return 0
    if isinstance(value, int | float):
        return int(value)
    return 0


def node_summary(node: str, pod: str, status: NodeStatus | None,
                 error: str | None = None, drain: Mapping[str, Any] | None = None
                 ) -> dict[str, Any]:
    """One entry of ``status.nodes`` from a daemon's ``/status`` answer (None: unreachable)."""
    entry: dict[str, Any] = {"node": node, "pod": pod}
    if status is None:
        entry.update(phase="Unreachable", dirtyBytes=0, cachedBytes=0, errors=0,
                     lastError=error or "no answer")
    else:
        entry.update(
            phase=status.state.capitalize(),
            dirtyBytes=status.dirty_bytes,
            dirtyFiles=status.dirty_files,
            uploadingFiles=status.uploading_files,
            cachedBytes=status.cached_bytes,
            uploadedBytesTotal=status.uploaded_bytes_total,
            errors=status.errors,
        )
        if status.capacity_bytes:
            entry["capacityBytes"] = status.capacity_bytes
        if status.last_flush_time is not None:
            entry["lastFlushTime"] = status.last_flush_time
        if status.last_error:
            entry["lastError"] = status.last_error[:300]
        if status.peers is not None:  # issue 17: peer copies, and why not RDMA
            entry.update(peerTransport=status.peers.transport,
                         peerTransportReason=status.peers.transport_reason[:300],
                         bytesHeldForPeers=status.peers.bytes_held_for_peers,
                         peerCopiesMissing=status.peers.copies_missing_total,
                         peerSuspects=list(status.peers.suspects))
    if drain:
        entry.update({k: v for k, v in drain.items() if v is not None})
    return entry


def totals(nodes: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    nodes = list(nodes)
    return {
        "nodes": len(nodes),
        "dirtyBytes": sum(_int(n.get("dirtyBytes")) for n in nodes),
        "cachedBytes": sum(_int(n.get("cachedBytes")) for n in nodes),
        "errors": sum(_int(n.get("errors")) for n in nodes),
        "conflicts": sum(_int(n.get("conflictsTotal")) for n in nodes),
    }


def _condition(kind: str, on: bool, reason: str, message: str,
               generation: int) -> dict[str, Any]:
    return {"type": kind, "status": "True" if on else "False", "reason": reason,
            "message": message, "observedGeneration": generation}


def _peer_copies(nodes: Sequence[Mapping[str, Any]], generation: int) -> dict[str, Any]:
    """``PeerCopies``: False while a node counts fsyncs that got fewer peer copies than asked
    (``peerCopiesMissing``, since its daemon started); the message also names the nodes whose
    peer transport fell back (e.g. no RDMA device) and why."""
    peered = [n for n in nodes if "peerTransport" in n]
    missing = [n for n in peered if _int(n.get("peerCopiesMissing")) > 0]
    reasons: dict[str, list[str]] = {}
    for n in peered:
        if "fallback" in str(n.get("peerTransportReason") or ""):
            reasons.setdefault(str(n["peerTransportReason"]), []).append(str(n["node"]))
    tail = "".join(f"; {', '.join(on)}: {reason}" for reason, on in reasons.items())
    if missing:
        return _condition("PeerCopies", False, "CopiesMissing", "; ".join(
            f"{n['node']}: {_int(n['peerCopiesMissing'])} fsync(s) with fewer peer copies "
            "than asked since the daemon started" for n in missing) + tail, generation)
    held = sum(_int(n.get("bytesHeldForPeers")) for n in peered)
    return _condition("PeerCopies", True, "CopiesMade",
                      f"no copy missing on {len(peered)} node(s); {human_bytes(held)} held for "
                      f"peers{tail}", generation)


def build_conditions(view: ClusterView, previous: Sequence[Mapping[str, Any]] = (),
                     now: str = "") -> list[dict[str, Any]]:
    """Ready, Progressing, Degraded, FlushBacklog and Draining, in that order; then
    PeerCopies when a node runs the peer network (issue 17).

    ``lastTransitionTime`` is kept from ``previous`` unless the condition's status changed.
    """
    g = view.generation
    ds = view.daemonset
    ds_status = (ds or {}).get("status") or {}
    desired = _int(ds_status.get("desiredNumberScheduled"))
    ready = _int(ds_status.get("numberReady"))
    updated = _int(ds_status.get("updatedNumberScheduled"))
    stale = _int((ds or {}).get("metadata", {}).get("generation")) > \
        _int(ds_status.get("observedGeneration"))
    nodes = list(view.nodes)
    unreachable = [n["node"] for n in nodes if n.get("phase") == "Unreachable"]
    failing = [n["node"] for n in nodes if n.get("phase") in ("Error", "Failed")]
    draining = [n for n in nodes if n.get("drainStartedAt") and not n.get("drainOutcome")]
    timed_out = [n["node"] for n in nodes if n.get("drainOutcome") == "TimedOut"]

    if ds is None:
        ready_c = _condition("Ready", False, "NotDeployed", "the cache daemons are not deployed"
                             + (f": {view.spec_problem.message}" if view.spec_problem else ""), g)
    elif desired == 0:
        ready_c = _condition("Ready", False, "NoNodes",
                             "no node matches spec.nodeSelector and tolerations", g)
    elif ready < desired or unreachable:
        ready_c = _condition("Ready", False, "NodesNotReady",
                             f"{ready}/{desired} cache daemons ready"
                             + (f"; unreachable: {', '.join(unreachable)}" if unreachable else ""),
                             g)
    else:
        ready_c = _condition("Ready", True, "AllNodesReady",
                             f"{ready}/{desired} cache daemons ready", g)

    if ds is not None and (stale or updated < desired or ready < desired):
        progressing = _condition("Progressing", True, "RollingOut",
                                 f"{updated}/{desired} daemons updated, {ready} ready", g)
    elif ds is None and view.spec_problem is None:
        progressing = _condition("Progressing", True, "Deploying", "creating the cache daemons", g)
    else:
        progressing = _condition("Progressing", False, "RolloutComplete",
                                 "every daemon runs the current configuration", g)

    if view.spec_problem:
        degraded = _condition("Degraded", True, view.spec_problem.reason,
                              view.spec_problem.message + " (the previous configuration keeps "
                              "running)", g)
    elif unreachable or failing:
        parts = []
        if unreachable:
            parts.append(f"control API unreachable on {', '.join(unreachable)}")
        if failing:
            parts.append(f"daemon failing on {', '.join(failing)}")
        degraded = _condition("Degraded", True, "DaemonUnhealthy", "; ".join(parts), g)
    elif timed_out:
        degraded = _condition("Degraded", True, "DrainTimedOut",
                              f"drain timed out with dirty data left on {', '.join(timed_out)}", g)
    else:
        degraded = _condition("Degraded", False, "AsExpected", "no problems observed", g)

    backlog = [n for n in nodes if n.get("capacityBytes")
               and _int(n.get("dirtyBytes")) >= BACKLOG_FRACTION * _int(n["capacityBytes"])]
    if backlog:
        flush = _condition("FlushBacklog", True, "DirtyDataHigh", "; ".join(
            f"{n['node']}: {human_bytes(_int(n['dirtyBytes']))} dirty of "
            f"{human_bytes(_int(n['capacityBytes']))}" for n in backlog), g)
    else:
        dirty = sum(_int(n.get("dirtyBytes")) for n in nodes)
        flush = _condition("FlushBacklog", False, "KeepingUp",
                           f"{human_bytes(dirty)} dirty across {len(nodes)} node(s)", g)

    if draining:
        drain = _condition("Draining", True, "NodesDraining", "; ".join(
            f"{n['node']}: {human_bytes(_int(n.get('dirtyBytes')))} left ({n.get('drainReason')})"
            for n in draining), g)
    else:
        done = [n for n in nodes if n.get("drainOutcome")]
        drain = _condition("Draining", False, "NoDrain" if not done else "DrainFinished",
                           "no node is draining" if not done else "; ".join(
                               f"{n['node']}: {n['drainOutcome']}" for n in done), g)

    conditions = [ready_c, progressing, degraded, flush, drain]
    if any("peerTransport" in n for n in nodes):
        conditions.append(_peer_copies(nodes, g))
    old = {c.get("type"): c for c in previous}
    result = []
    for cond in conditions:
        before = old.get(cond["type"])
        if before and before.get("status") == cond["status"] and before.get("lastTransitionTime"):
            cond["lastTransitionTime"] = before["lastTransitionTime"]
        else:
            cond["lastTransitionTime"] = now
        result.append(cond)
    return result

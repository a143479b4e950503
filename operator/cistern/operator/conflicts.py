"""Conflicts the daemons report (an upload refused because another writer replaced the object;
the node kept its version under a conflict name): the per-node status fields, and which
conflicts have not been announced yet.

The dedupe key is the node's ``conflictsTotal`` already written to the WriteCache's status: a
conflict is announced (one Event per node and refresh, however many arrived since) when the
daemon's ``conflicts_total`` passes it. A new daemon pod, or a counter lower than the one
written (the daemon restarted in the same pod), starts from zero.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cistern.nodestatus import NodeStatus

__all__ = ["CONFLICT_REASON", "NewConflicts", "track_conflicts"]

#: The Event reason of a conflict.
CONFLICT_REASON = "ObjectConflict"
_FIELDS = ("conflictsTotal", "lastConflict")


@dataclass(frozen=True)
class NewConflicts:
    """Conflicts on one node that no Event has announced yet."""

    node: str
    count: int
    total: int
    latest: str | None
    """``<key> -> <conflict key>`` as the daemon reports it (object keys only, no secrets)."""

    def message(self) -> str:
        what = (f"{self.count} upload(s) refused because another writer replaced the object "
                f"({self.total} on this node's daemon)")
        if not self.latest:
            return f"node {self.node}: {what}"
        key, _, kept = self.latest.partition(" -> ")
        where = f"; this node's version was kept as {kept}" if kept else ""
        return f"node {self.node}: {what}; latest: {key} keeps the other writer's object{where}"


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def track_conflicts(node: str, pod: str, status: NodeStatus | None,
                    previous: Mapping[str, Any]) -> tuple[dict[str, Any], NewConflicts | None]:
    """The conflict fields of ``node``'s status entry and the conflicts not announced yet.

    ``previous``: the node's entry in the status as last written (may be empty). An
    unreachable daemon (``status`` None) keeps the fields written for the same pod, so the
    count is not announced again when it answers.
    """
    same_pod = previous.get("pod") == pod
    if status is None:
        return ({k: previous[k] for k in _FIELDS if k in previous} if same_pod else {}), None
    fields: dict[str, Any] = {"conflictsTotal": status.conflicts_total}
    if status.last_conflict:
        fields["lastConflict"] = status.last_conflict
    seen = _count(previous.get("conflictsTotal")) if same_pod else 0
    if status.conflicts_total < seen:  # the daemon restarted: its counter started again
        seen = 0
    if status.conflicts_total <= seen:
        return fields, None
    return fields, NewConflicts(node=node, count=status.conflicts_total - seen,
                                total=status.conflicts_total, latest=status.last_conflict)

"""Which namespaces may use a cache: the access policies the operator publishes.

The operator resolves each WriteCache's ``spec.access`` (its own namespace, a list, a label
selector) into a namespace list and writes it, as ``<cache-key>.json``, into the ConfigMap
``cistern-access`` in the chart's namespace; the node plugin and the controller mount it
read-only (mode 0400, root) at ``--access-dir``. The kubelet refreshes the files when the
ConfigMap changes, so a policy is read at every call, never remembered. A policy::

    {"writeCache": "team-a/ckpt", "namespaces": ["team-a", "team-b"]}

``"*"`` in ``namespaces`` admits every namespace. A cache without a policy file admits no
namespace: an unknown cache is never open by default.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

from cistern.csi.errors import PermissionDenied

__all__ = ["AccessPolicies", "AccessPolicy"]

log = logging.getLogger(__name__)

_MAX_POLICY = 1 << 20


@dataclass(frozen=True)
class AccessPolicy:
    write_cache: str
    """``namespace/name`` of the WriteCache (for messages)."""
    namespaces: frozenset[str]

    def admits(self, namespace: str) -> bool:
        return "*" in self.namespaces or namespace in self.namespaces


class AccessPolicies:
    """The access policies under one directory."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def load(self, key: str) -> AccessPolicy | None:
        """The policy of cache ``key``; None when there is none (or it is unreadable)."""
        path = os.path.join(self.directory, f"{key}.json")
        try:
            with open(path, "rb") as file:
                data = json.loads(file.read(_MAX_POLICY))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("access policy %s is unreadable (%s); treating cache %s as closed",
                        path, exc, key)
            return None
        names = data.get("namespaces") if isinstance(data, dict) else None
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            log.warning("access policy %s has no namespace list; treating cache %s as closed",
                        path, key)
            return None
        return AccessPolicy(str(data.get("writeCache") or key), frozenset(names))

    def check(self, key: str, namespace: str, what: str) -> None:
        """Raise PERMISSION_DENIED unless ``namespace`` may use cache ``key``."""
        policy = self.load(key)
        if policy is None:
            raise PermissionDenied(f"{what}: namespace {namespace!r} may not use cache {key!r}: "
                                   f"the cache has no access policy on this node (is its "
                                   f"WriteCache reconciled? policies reach the node within a "
                                   f"minute)")
        if not policy.admits(namespace):
            raise PermissionDenied(f"{what}: namespace {namespace!r} may not use WriteCache "
                                   f"{policy.write_cache!r}; its spec.access admits "
                                   f"{', '.join(sorted(policy.namespaces)) or 'no namespace'}")

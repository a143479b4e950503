"""The Kubernetes side of a WriteCache's peer network (``spec.durability``, issue 17).

With a durability level (or a path rule) of ``peers``, every cache daemon runs a peer server on
``<pod IP>:<spec.peers.port>`` (the node config and the DaemonSet's port, flag and mounts are
rendered in ``manifests``); this module owns the two objects the daemons read, both in the
workload namespace next to the privileged daemons, never in the tenant's:

- Secret ``cistern-KEY-peer-token``: the shared token the daemons authenticate each other with
  (32 random bytes, URL-safe; made once, never logged, never in the status or an Event);
- ConfigMap ``cistern-KEY-peers``: ``members.json`` = ``{"members": [{node, host, port}]}``,
  one entry per node: its daemon pod that has an IP and is not being deleted (ready or not: a
  member that does not answer is skipped by the nodes themselves, while one that vanished from
  the list for ``peers.deadAfter`` is taken for dead and its copies uploaded by its peers). Kept
  current from the pods on every status refresh; a ConfigMap volume is updated in place and
  the daemons re-read the file when it changes.

Without peers (or the WriteCache gone), both are removed. Every method decides from what it
reads.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterable, Mapping
from typing import Any

from cistern.operator import manifests
from cistern.operator.bodies import valid_spec
from cistern.operator.daemons import DaemonEndpoint
from cistern.operator.kubeapi import CONFIGMAPS, SECRETS, KubeApi, Resource
from cistern.operator.settings import OperatorSettings
from cistern.writecache import PEER_MEMBERS_KEY, WriteCacheSpec

__all__ = ["PeerNetwork", "members_configmap", "members_json", "port_problem", "token_secret"]

#: Random bytes in a peer token (the node side needs at least 16).
TOKEN_BYTES = 32


def port_problem(spec: WriteCacheSpec, settings: OperatorSettings) -> str | None:
    """Why ``spec.peers.port`` cannot be used on the daemon pods (None: it can)."""
    if not spec.durability.uses_peers:
        return None
    port = spec.peers.port
    if port == settings.control_port:
        return f"spec.peers.port: {port} is the cache daemons' control port; choose another"
    if spec.s3_endpoint.enabled and port == spec.s3_endpoint.port:
        return f"spec.peers.port: {port} is also spec.s3Endpoint.port; choose another"
    return None


def members_json(endpoints: Iterable[DaemonEndpoint], port: int) -> str:
    """The members file: one entry per node (its ready pod when a replaced one lingers with an
    IP), sorted by node: stable text, so an unchanged membership never rewrites the ConfigMap."""
    chosen: dict[str, DaemonEndpoint] = {}
    for e in sorted(endpoints, key=lambda e: (e.node, not e.ready, e.host)):
        chosen.setdefault(e.node, e)
    return json.dumps({"members": [{"node": e.node, "host": e.host, "port": port}
                                   for e in chosen.values()]}, indent=1, sort_keys=True)


def members_configmap(body: Mapping[str, Any], endpoints: Iterable[DaemonEndpoint], port: int,
                      settings: OperatorSettings) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": manifests._workload_meta(body, manifests.names_of(body).peer_members,
                                             "peer-members", settings),
        "data": {PEER_MEMBERS_KEY: members_json(endpoints, port)},
    }


def token_secret(body: Mapping[str, Any], token: str,
                 settings: OperatorSettings) -> dict[str, Any]:
    return manifests.token_secret(body, manifests.names_of(body).peer_token, "peer-token",
                                  token, settings)


class PeerNetwork:
    """Creates, keeps current and removes one WriteCache's peer token and members list."""

    def __init__(self, api: KubeApi, settings: OperatorSettings) -> None:
        self.api = api
        self.settings = settings

    async def sync(self, body: Mapping[str, Any], spec: WriteCacheSpec,
                   endpoints: Iterable[DaemonEndpoint]) -> dict[str, str]:
        """``{"PeerToken": ..., "PeerMembers": ...}`` (created/patched/unchanged/deleted);
        called with a validated spec, before the DaemonSet that mounts both is applied."""
        if not spec.durability.uses_peers:
            return await self.remove(body)
        n = manifests.names_of(body)
        results = {"PeerToken": "unchanged"}
        if await self.api.get(SECRETS, n.peer_token, self.settings.workload_namespace) is None:
            # Made once: the daemons read it at start, so a new token would split them.
            await self.api.create(SECRETS, token_secret(
                body, secrets.token_urlsafe(TOKEN_BYTES), self.settings),
                self.settings.workload_namespace)
            results["PeerToken"] = "created"
        results["PeerMembers"] = await self.api.apply(CONFIGMAPS, members_configmap(
            body, endpoints, spec.peers.port, self.settings))
        return results

    async def follow_pods(self, body: Mapping[str, Any],
                          endpoints: Iterable[DaemonEndpoint]) -> str:
        """Keep an existing members list in step with the daemon pods. Creates nothing: what
        a spec rolls out is ``sync``'s; a spec that was refused (``status.specProblem``) keeps
        the list the running daemons got (its port may not be theirs)."""
        spec = valid_spec(body)
        if spec is None or not spec.durability.uses_peers or \
                (body.get("status") or {}).get("specProblem"):
            return "unchanged"
        n = manifests.names_of(body)
        if await self.api.get(CONFIGMAPS, n.peer_members,
                              self.settings.workload_namespace) is None:
            return "unchanged"
        return await self.api.apply(CONFIGMAPS, members_configmap(
            body, endpoints, spec.peers.port, self.settings))

    async def remove(self, body: Mapping[str, Any]) -> dict[str, str]:
        n = manifests.names_of(body)
        return {"PeerToken": await self._delete(SECRETS, n.peer_token),
                "PeerMembers": await self._delete(CONFIGMAPS, n.peer_members)}

    async def _delete(self, resource: Resource, name: str) -> str:
        workload = self.settings.workload_namespace
        if await self.api.get(resource, name, workload) is None:
            return "unchanged"  # read first: a cache without peers sends no DELETE
        return "deleted" if await self.api.delete(resource, name, workload) else "unchanged"

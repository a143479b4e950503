"""The node topology label ``csi.cistern.dev/<namespace>.<name>=true``: on exactly the nodes
that run the cache."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from cistern.operator import manifests
from cistern.operator.bodies import valid_spec
from cistern.operator.kubeapi import NODES, ApiError, KubeApi

__all__ = ["NodeLabels"]

logger = logging.getLogger(__name__)


class NodeLabels:
    def __init__(self, api: KubeApi) -> None:
        self.api = api

    async def sync(self, body: Mapping[str, Any], daemon_nodes: set[str],
                   node_objects: Mapping[str, Mapping[str, Any]]) -> None:
        """Label ``csi.cistern.dev/<name>=true`` exactly the nodes that run this cache.

        The CSI node plugin reports that topology key only for caches mounted when the kubelet
        registered it; the label is what the scheduler reads, so the operator keeps it true to
        the daemon pods: set where a daemon pod is scheduled on a node that still matches the
        WriteCache's ``nodeSelector``, removed everywhere else.
        """
        name, namespace = body["metadata"]["name"], body["metadata"]["namespace"]
        spec = valid_spec(body)
        if spec is None:  # an invalid spec keeps the last good placement
            return
        key = manifests.topology_label(name, namespace)
        for node_name, node in node_objects.items():
            has = (node.get("metadata", {}).get("labels") or {}).get(key) == "true"
            wants = node_name in daemon_nodes and manifests.node_matches(node, spec.node_selector)
            if wants != has:
                await self._set(node_name, key, wants)

    async def _set(self, node: str, key: str, present: bool) -> None:
        patch = {"metadata": {"labels": {key: "true" if present else None}}}
        try:
            await self.api.patch(NODES, node, patch)
        except ApiError as exc:
            if exc.status != 404:  # a node deleted meanwhile needs no label
                raise
            return
        logger.info("Node %s: %s label %s", node, "set" if present else "removed", key)

    async def remove(self, name: str, namespace: str) -> None:
        """Remove this cache's label only: a same-named cache of another namespace keeps its
        own (``csi.cistern.dev/<namespace>.<name>``)."""
        key = manifests.topology_label(name, namespace)
        for node in await self.api.list(NODES):
            if key in (node.get("metadata", {}).get("labels") or {}):
                await self._set(node["metadata"]["name"], key, False)

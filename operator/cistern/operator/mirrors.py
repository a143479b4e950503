"""What a WriteCache mirrors from its tenant's namespace into the workload namespace.

The privileged daemons run in the operator's namespace, so what they need from the tenant is
copied there and kept in step: the credentials Secret the WriteCache names (only its AWS keys)
and the cache's access policy (the namespaces that may use it, a label selector resolved now)
as the entry ``<key>.json`` of the ConfigMap ``cistern-access``, which the CSI driver reads.
Every method decides from what it reads, so repeating one is harmless.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cistern.operator import manifests
from cistern.operator.kubeapi import CONFIGMAPS, NAMESPACES, SECRETS, KubeApi
from cistern.operator.settings import OperatorSettings
from cistern.operator.tenancy import selected_namespaces
from cistern.writecache import WriteCacheSpec

__all__ = ["Mirrors"]


class Mirrors:
    def __init__(self, api: KubeApi, settings: OperatorSettings) -> None:
        self.api = api
        self.settings = settings

    async def credentials(self, body: Mapping[str, Any], spec: WriteCacheSpec) -> str:
        """Copy the tenant's credentials Secret into the workload namespace (or update the
        copy); the daemons read only the copy. ``created``/``patched``/``unchanged``/``gone``."""
        meta = body["metadata"]
        source_name = spec.object_store.credentials_secret
        copy_name = manifests.names(meta["name"], meta["namespace"]).credentials
        source = None
        if source_name:
            source = await self.api.get(SECRETS, source_name, meta["namespace"])
        if source is None:
            # No reference (the node's own identity), or the Secret vanished: a copy must not
            # outlive what it copies.
            if await self.api.get(SECRETS, copy_name, self.settings.workload_namespace):
                await self.api.delete(SECRETS, copy_name, self.settings.workload_namespace)
                return "deleted"
            return "unchanged"
        return await self.api.apply(SECRETS, manifests.credentials_secret(
            body, source, self.settings))

    async def access(self, body: Mapping[str, Any], spec: WriteCacheSpec) -> str:
        """Publish which namespaces may use this cache (``cistern-access``, read by the CSI
        driver); a label selector is resolved against the namespaces now."""
        selected: list[str] = []
        if spec.access.namespace_selector is not None:
            selected = selected_namespaces(await self.api.list(NAMESPACES),
                                           spec.access.namespace_selector)
        key, policy = manifests.access_policy(body, spec, selected)
        return await self._set_access_entry(key, policy)

    async def remove_access(self, key: str) -> None:
        """Drop cache ``key``'s entry (its WriteCache is gone)."""
        await self._set_access_entry(f"{key}.json", None)

    async def _set_access_entry(self, key: str, policy: str | None) -> str:
        workload = self.settings.workload_namespace
        current = await self.api.get(CONFIGMAPS, manifests.ACCESS_CONFIGMAP, workload)
        if current is None:
            if policy is None:
                return "unchanged"
            await self.api.create(CONFIGMAPS, {
                "apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": manifests.ACCESS_CONFIGMAP, "namespace": workload,
                             "labels": {"app.kubernetes.io/name": "cistern",
                                        "app.kubernetes.io/managed-by": "cistern-operator",
                                        manifests.LABEL_ROLE: "access"}},
                "data": {key: policy}}, workload)
            return "created"
        if (current.get("data") or {}).get(key) == policy:
            return "unchanged"
        await self.api.patch(CONFIGMAPS, manifests.ACCESS_CONFIGMAP, {"data": {key: policy}},
                             workload)
        return "patched" if policy is not None else "deleted"

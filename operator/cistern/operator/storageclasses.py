"""The WriteCache's StorageClass: applied, replaced when an immutable field changes, removed."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cistern.operator import manifests
from cistern.operator.kubeapi import STORAGECLASSES, KubeApi
from cistern.operator.problems import Problem
from cistern.operator.settings import OperatorSettings
from cistern.writecache import WriteCacheSpec

__all__ = ["StorageClasses"]

#: Fields the API server refuses to change on an existing StorageClass.
IMMUTABLE = ("provisioner", "parameters", "reclaimPolicy", "volumeBindingMode")


class StorageClasses:
    def __init__(self, api: KubeApi, settings: OperatorSettings) -> None:
        self.api = api
        self.settings = settings

    async def apply(self, body: Mapping[str, Any], spec: WriteCacheSpec) -> str:
        """StorageClass parameters and reclaim policy are immutable: replace it if they change."""
        desired = manifests.storage_class(body, spec)
        await self.delete(body, keep=desired["metadata"]["name"])
        current = await self.api.get(STORAGECLASSES, desired["metadata"]["name"])
        if current is not None:
            owner = current.get("metadata", {}).get("labels", {})
            if owner.get(manifests.LABEL_WRITECACHE) != body["metadata"]["name"] or owner.get(
                    "cistern.dev/writecache-namespace") != body["metadata"]["namespace"]:
                raise Problem("StorageClassConflict", f"StorageClass "
                              f"{desired['metadata']['name']} exists and belongs to someone "
                              "else; set spec.csi.storageClassName", temporary=True,
                              delay=self.settings.retry_delay)
            if any(current.get(k) != desired.get(k) for k in IMMUTABLE):
                await self.api.delete(STORAGECLASSES, desired["metadata"]["name"])
                await self.api.create(STORAGECLASSES, desired)
                return "replaced"
        return await self.api.apply(STORAGECLASSES, desired)

    async def delete(self, body: Mapping[str, Any], keep: str | None) -> None:
        """Delete this WriteCache's StorageClasses except ``keep`` (None: all of them)."""
        meta = body["metadata"]
        for sc in await self.api.list(STORAGECLASSES, label_selector={
                manifests.LABEL_WRITECACHE: meta["name"],
                "cistern.dev/writecache-namespace": meta["namespace"]}):
            if sc["metadata"]["name"] != keep:
                await self.api.delete(STORAGECLASSES, sc["metadata"]["name"])

"""The Kubernetes side of a WriteCache's S3 endpoint (``spec.s3Endpoint``, docs/s3-endpoint.md).

With the endpoint enabled every cache daemon serves S3 on ``<pod IP>:<port>`` (the node config
and the DaemonSet's port and key mount are rendered in ``manifests``); this module owns the two
objects around it, both in the workload namespace next to the daemons:

- Secret ``cistern-KEY-s3-credentials``: a copy of the tenant's Secret named by
  ``spec.s3Endpoint.credentialsSecretRef`` (only ``accessKeyId`` and ``secretAccessKey``), kept
  in step with its source like the bucket credentials; the daemons read only the copy;
- Service ``Names.s3_service`` with ``internalTrafficPolicy: Local``: a client pod reaches the
  daemon of its own node only (none there: a connection error, never another node's cache), so
  "durable on the node" means the node the writer runs on. Its URL is ``status.s3Endpoint``.

Disabled (or the WriteCache gone), both are removed. Every method decides from what it reads.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any

from cistern.operator import manifests
from cistern.operator.kubeapi import SECRETS, SERVICES, KubeApi, Resource
from cistern.operator.settings import OperatorSettings
from cistern.writecache import WriteCacheSpec

__all__ = ["S3_CREDENTIAL_KEYS", "S3EndpointObjects", "credentials_copy", "endpoint_url",
           "missing_keys", "service"]

#: The keys of the endpoint's Secret: the file names the daemon reads in ``credentialsDir``.
S3_CREDENTIAL_KEYS = ("accessKeyId", "secretAccessKey")


def endpoint_url(body: Mapping[str, Any], spec: WriteCacheSpec,
                 settings: OperatorSettings) -> str | None:
    """What pods put in ``AWS_ENDPOINT_URL``; None when the endpoint is off."""
    if not spec.s3_endpoint.enabled:
        return None
    n = manifests.names_of(body)
    return f"http://{n.s3_service}.{settings.workload_namespace}.svc:{spec.s3_endpoint.port}"


def missing_keys(secret: Mapping[str, Any]) -> list[str]:
    """The endpoint keys a Secret lacks (absent or empty)."""
    data = secret.get("data") or {}
    return [k for k in S3_CREDENTIAL_KEYS if not base64.b64decode(data.get(k) or "").strip()]


def credentials_copy(body: Mapping[str, Any], source: Mapping[str, Any],
                     settings: OperatorSettings) -> dict[str, Any]:
    """The workload namespace's copy of the endpoint's Secret (its two keys, base64 as read)."""
    data = source.get("data") or {}
    meta = manifests._workload_meta(body, manifests.names_of(body).s3_credentials,
                                    "s3-credentials", settings)
    meta["annotations"] = {"cistern.dev/copied-from":
                           f"{body['metadata']['namespace']}/"
                           f"{(source.get('metadata') or {}).get('name', '')}"}
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque", "metadata": meta,
            "data": {k: data[k] for k in S3_CREDENTIAL_KEYS if k in data}}


def service(body: Mapping[str, Any], spec: WriteCacheSpec,
            settings: OperatorSettings) -> dict[str, Any]:
    """A ClusterIP Service over this WriteCache's daemons that routes node-locally only."""
    meta = body["metadata"]
    n = manifests.names_of(body)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": manifests._workload_meta(body, n.s3_service, "s3-endpoint", settings),
        "spec": {
            "type": "ClusterIP",
            "selector": manifests.workload_selector(meta["name"], meta["namespace"],
                                                    "cache-node"),
            "internalTrafficPolicy": "Local",
            "ports": [{"name": "s3", "protocol": "TCP", "port": spec.s3_endpoint.port,
                       "targetPort": "s3"}],
        },
    }


class S3EndpointObjects:
    """Creates, updates and removes one WriteCache's endpoint Secret copy and Service."""

    def __init__(self, api: KubeApi, settings: OperatorSettings) -> None:
        self.api = api
        self.settings = settings

    async def sync(self, body: Mapping[str, Any], spec: WriteCacheSpec) -> dict[str, str]:
        """``{"S3Credentials": ..., "S3Service": ...}`` (created/patched/unchanged/deleted)."""
        if not spec.s3_endpoint.enabled:
            return await self.remove(body)
        meta = body["metadata"]
        source = await self.api.get(SECRETS, spec.s3_endpoint.credentials_secret or "",
                                    meta["namespace"])
        results = {}
        if source is None:
            # The source vanished: the copy must not outlive it (the daemon then refuses
            # every request until the Secret is back); validation reports why.
            results["S3Credentials"] = await self._delete(
                SECRETS, manifests.names_of(body).s3_credentials)
        else:
            results["S3Credentials"] = await self.api.apply(
                SECRETS, credentials_copy(body, source, self.settings))
        results["S3Service"] = await self.api.apply(SERVICES,
                                                    service(body, spec, self.settings))
        return results

    async def follow_source(self, body: Mapping[str, Any], spec: WriteCacheSpec) -> str:
        """Keep an existing key copy in step with its source (a rotated key). Creates
        nothing: what a spec rolls out is ``sync``'s, called when the spec was validated."""
        n = manifests.names_of(body)
        if not spec.s3_endpoint.enabled or await self.api.get(
                SECRETS, n.s3_credentials, self.settings.workload_namespace) is None:
            return "unchanged"
        source = await self.api.get(SECRETS, spec.s3_endpoint.credentials_secret or "",
                                    body["metadata"]["namespace"])
        if source is None:
            return await self._delete(SECRETS, n.s3_credentials)
        return await self.api.apply(SECRETS, credentials_copy(body, source, self.settings))

    async def remove(self, body: Mapping[str, Any]) -> dict[str, str]:
        n = manifests.names_of(body)
        return {"S3Credentials": await self._delete(SECRETS, n.s3_credentials),
                "S3Service": await self._delete(SERVICES, n.s3_service)}

    async def _delete(self, resource: Resource, name: str) -> str:
        workload = self.settings.workload_namespace
        if await self.api.get(resource, name, workload) is None:
            return "unchanged"
        await self.api.delete(resource, name, workload)
        return "deleted"

"""A small asynchronous Kubernetes API client (aiohttp, the loop kopf runs on).

Only what the operator needs: get, list, create, merge-patch, delete, events, and ``apply``
(create or patch by observation, see ``patches``). Credentials are the standard ones,
loaded once in ``main()``: in-cluster service account, else ``KUBECONFIG`` /
``~/.kube/config``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp

from cistern.operator.httpsession import LazySession
from cistern.operator.patches import LAST_APPLIED, merge_patch

__all__ = ["ApiError", "Credentials", "KubeApi", "Resource", "load_credentials"]

logger = logging.getLogger(__name__)

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


class ApiError(Exception):
    """The API server answered with an error status."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class Resource:
    """A REST resource: API group (``""`` for core), version, plural, namespaced or not."""

    group: str
    version: str
    plural: str
    namespaced: bool = True

    def path(self, namespace: str | None = None, name: str | None = None,
             subresource: str | None = None) -> str:
        base = f"/api/{self.version}" if not self.group else f"/apis/{self.group}/{self.version}"
        if self.namespaced and namespace:
            base += f"/namespaces/{quote(namespace, safe='')}"
        base += f"/{self.plural}"
        if name:
            base += f"/{quote(name, safe='')}"
        if subresource:
            base += f"/{subresource}"
        return base


CONFIGMAPS = Resource("", "v1", "configmaps")
SECRETS = Resource("", "v1", "secrets")
SERVICES = Resource("", "v1", "services")
PODS = Resource("", "v1", "pods")
NODES = Resource("", "v1", "nodes", namespaced=False)
NAMESPACES = Resource("", "v1", "namespaces", namespaced=False)
EVENTS = Resource("", "v1", "events")
DAEMONSETS = Resource("apps", "v1", "daemonsets")
PDBS = Resource("policy", "v1", "poddisruptionbudgets")
STORAGECLASSES = Resource("storage.k8s.io", "v1", "storageclasses", namespaced=False)
WRITECACHES = Resource("cistern.dev", "v1alpha1", "writecaches")


@dataclass(frozen=True)
class Credentials:
    """How to reach and authenticate to the API server."""

    server: str
    """Base URL, e.g. https://10.0.0.1:443."""
    token: str | None = None
    """Bearer token (kubeconfig token or exec/auth-provider result)."""
    token_file: str | None = None
    """File with a bearer token, re-read periodically (projected service-account tokens rotate)."""
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    insecure: bool = False
    default_namespace: str | None = None


def load_credentials() -> Credentials:
    """In-cluster service account if present, else the kubeconfig (``KUBECONFIG`` or default)."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
        cfg = client.Configuration.get_default_copy()
        namespace = None
        try:
            with open(f"{SERVICE_ACCOUNT_DIR}/namespace") as file:
                namespace = file.read().strip() or None
        except OSError:
            pass
        return Credentials(server=cfg.host, token_file=f"{SERVICE_ACCOUNT_DIR}/token",
                           ca_file=cfg.ssl_ca_cert, default_namespace=namespace)
    except config.ConfigException:
        pass
    cfg = client.Configuration()
    config.load_kube_config(client_configuration=cfg)
    token = (cfg.api_key or {}).get("authorization") or (cfg.api_key or {}).get("BearerToken")
    if token and token.lower().startswith("bearer "):
        token = token[7:]
    _, context = config.list_kube_config_contexts()
    return Credentials(server=cfg.host, token=token, ca_file=cfg.ssl_ca_cert,
                       cert_file=cfg.cert_file, key_file=cfg.key_file,
                       insecure=not cfg.verify_ssl,
                       default_namespace=(context or {}).get("context", {}).get("namespace"))


class KubeApi:
    """Asynchronous JSON calls to the API server with one shared aiohttp session."""

    TOKEN_REFRESH = 60.0

    def __init__(self, credentials: Credentials, timeout: float = 30.0) -> None:
        self.credentials = credentials
        self._session = LazySession(
            timeout, lambda: ApiError(503, "ClientClosed", "the operator is shutting down"))
        self._token = credentials.token
        self._token_read_at = 0.0

    async def close(self) -> None:
        """Close the session; later calls fail (a handler still running at shutdown)."""
        await self._session.close()

    async def _connector(self) -> aiohttp.BaseConnector | None:
        if not self.credentials.server.startswith("https"):
            return None
        return aiohttp.TCPConnector(ssl=await asyncio.to_thread(self._ssl_context))

    def _ssl_context(self) -> ssl.SSLContext:
        creds = self.credentials
        context = ssl.create_default_context(cafile=creds.ca_file)
        if creds.insecure:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        if creds.cert_file:
            context.load_cert_chain(creds.cert_file, creds.key_file)
        return context

    async def _auth_headers(self) -> dict[str, str]:
        file = self.credentials.token_file
        if file and time.monotonic() - self._token_read_at > self.TOKEN_REFRESH:
            self._token = (await asyncio.to_thread(_read_text, file)).strip()
            self._token_read_at = time.monotonic()
        return {"Authorization": f"Bearer {self._token}"} if self._token else {}

    async def request(self, method: str, path: str, body: Any = None,
                      content_type: str = "application/json",
                      params: Mapping[str, str] | None = None) -> Any:
        session = await self._session.get(self._connector)
        url = self.credentials.server.rstrip("/") + path
        if params:
            url += "?" + urlencode(params)
        headers = await self._auth_headers()
        headers["Accept"] = "application/json"
        data = None
        if body is not None:
            headers["Content-Type"] = content_type
            data = json.dumps(body)
        async with session.request(method, url, data=data, headers=headers) as response:
            text = await response.text()
            if response.status >= 400:
                reason, message = response.reason or "", text
                try:
                    status = json.loads(text)
                    reason = status.get("reason") or reason
                    message = status.get("message") or message
                except ValueError:
                    pass
                raise ApiError(response.status, str(reason), str(message)[:500])
            return json.loads(text) if text else None

    async def get(self, resource: Resource, name: str,
                  namespace: str | None = None) -> dict[str, Any] | None:
        """The object, or None if it does not exist."""
        try:
            result = await self.request("GET", resource.path(namespace, name))
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise
        return dict(result)

    async def list(self, resource: Resource, namespace: str | None = None,
                   label_selector: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
        params = {}
        if label_selector:
            params["labelSelector"] = ",".join(f"{k}={v}" for k, v in label_selector.items())
        result = await self.request("GET", resource.path(namespace), params=params)
        items = [dict(item) for item in (result or {}).get("items", [])]
        if label_selector:  # also filter locally: not every server honours the selector
            items = [item for item in items if all(
                item.get("metadata", {}).get("labels", {}).get(k) == v
                for k, v in label_selector.items())]
        return items

    async def create(self, resource: Resource, body: Mapping[str, Any],
                     namespace: str | None = None) -> dict[str, Any]:
        return dict(await self.request("POST", resource.path(namespace), body))

    async def patch(self, resource: Resource, name: str, patch: Mapping[str, Any],
                    namespace: str | None = None,
                    subresource: str | None = None) -> dict[str, Any]:
        return dict(await self.request("PATCH", resource.path(namespace, name, subresource),
                                       patch, content_type="application/merge-patch+json"))

    async def delete(self, resource: Resource, name: str,
                     namespace: str | None = None) -> bool:
        """Delete (background propagation); False if it was already gone."""
        try:
            await self.request("DELETE", resource.path(namespace, name),
                               {"kind": "DeleteOptions", "apiVersion": "v1",
                                "propagationPolicy": "Background"})
        except ApiError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    async def apply(self, resource: Resource, desired: Mapping[str, Any]) -> str:
        """Create ``desired`` or patch the live object towards it; never writes if it matches.

        Returns ``"created"``, ``"patched"`` or ``"unchanged"``.
        """
        meta = desired["metadata"]
        namespace = meta.get("namespace") if resource.namespaced else None
        record = json.dumps(desired, sort_keys=True, separators=(",", ":"))
        body = _with_annotation(desired, LAST_APPLIED, record)
        current = await self.get(resource, meta["name"], namespace)
        if current is None:
            await self.create(resource, body, namespace)
            return "created"
        previous_text = current.get("metadata", {}).get("annotations", {}).get(LAST_APPLIED)
        try:
            previous = json.loads(previous_text) if previous_text else None
        except ValueError:
            previous = None
        patch = merge_patch(current, desired, previous)
        if not patch:
            return "unchanged"
        patch = _with_annotation(patch, LAST_APPLIED, record)
        await self.patch(resource, meta["name"], patch, namespace)
        return "patched"


def _with_annotation(obj: Mapping[str, Any], key: str, value: str) -> dict[str, Any]:
    out = dict(obj)
    meta = dict(out.get("metadata") or {})
    annotations = dict(meta.get("annotations") or {})
    annotations[key] = value
    meta["annotations"] = annotations
    out["metadata"] = meta
    return out


def _read_text(path: str) -> str:
    with open(path) as file:
        return file.read()

"""A small synchronous JSON client of the Kubernetes API (the pod runner and its doubles).

It speaks plain HTTP to the emulator (KMock) the tests run; the server comes from a
kubeconfig (the file the runner hands to pods in place of a service-account token) or a URL.
Label selectors are also applied locally: not every emulator honours them.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

__all__ = ["ApiClient", "ApiError", "resource_path", "write_kubeconfig"]

#: plural -> (group/version prefix, namespaced)
_RESOURCES: dict[str, tuple[str, bool]] = {
    "pods": ("api/v1", True),
    "nodes": ("api/v1", False),
    "configmaps": ("api/v1", True),
    "secrets": ("api/v1", True),
    "events": ("api/v1", True),
    "persistentvolumeclaims": ("api/v1", True),
    "persistentvolumes": ("api/v1", False),
    "daemonsets": ("apis/apps/v1", True),
    "deployments": ("apis/apps/v1", True),
    "storageclasses": ("apis/storage.k8s.io/v1", False),
    "csidrivers": ("apis/storage.k8s.io/v1", False),
    "poddisruptionbudgets": ("apis/policy/v1", True),
    "writecaches": ("apis/cistern.dev/v1alpha1", True),
}


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


def resource_path(plural: str, namespace: str | None = None, name: str | None = None,
                  subresource: str | None = None) -> str:
    prefix, namespaced = _RESOURCES[plural]
    path = f"/{prefix}"
    if namespaced and namespace:
        path += f"/namespaces/{namespace}"
    path += f"/{plural}"
    if name:
        path += f"/{name}"
    if subresource:
        path += f"/{subresource}"
    return path


def write_kubeconfig(path: Path, server: str) -> Path:
    """A kubeconfig for ``server`` (no credentials: the emulator needs none)."""
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "test",
        "clusters": [{"name": "test", "cluster": {"server": server}}],
        "users": [{"name": "test", "user": {}}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}]}))
    return path


class ApiClient:
    def __init__(self, server: str, timeout: float = 10.0) -> None:
        self.server = server.rstrip("/")
        self.timeout = timeout

    @classmethod
    def from_kubeconfig(cls, path: str | None = None) -> ApiClient:
        config = yaml.safe_load(Path(path or os.environ["KUBECONFIG"]).read_text())
        context = next(c for c in config["contexts"] if c["name"] == config["current-context"])
        cluster = next(c for c in config["clusters"]
                       if c["name"] == context["context"]["cluster"])
        return cls(cluster["cluster"]["server"])

    def _call(self, method: str, path: str, body: Any = None,
              content_type: str = "application/json") -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.server + path, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                text = response.read()
        except urllib.error.HTTPError as exc:
            raise ApiError(exc.code, exc.read().decode(errors="replace")[:300]) from None
        return json.loads(text) if text else None

    def get(self, plural: str, name: str, namespace: str | None = None) -> dict[str, Any] | None:
        try:
            obj = self._call("GET", resource_path(plural, namespace, name))
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise
        if not isinstance(obj, dict) or (obj.get("metadata") or {}).get("name") != name:
            return None
        return obj

    def list(self, plural: str, namespace: str | None = None,
             labels: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
        query = ""
        if labels:
            query = "?labelSelector=" + ",".join(f"{k}={v}" for k, v in labels.items())
        items = self._call("GET", resource_path(plural, namespace) + query).get("items") or []
        if labels:
            items = [i for i in items if all(
                ((i.get("metadata") or {}).get("labels") or {}).get(k) == v
                for k, v in labels.items())]
        return [dict(i) for i in items]

    def create(self, plural: str, obj: Mapping[str, Any],
               namespace: str | None = None) -> dict[str, Any]:
        namespace = namespace or (obj.get("metadata") or {}).get("namespace")
        return dict(self._call("POST", resource_path(plural, namespace), dict(obj)))

    def patch(self, plural: str, name: str, patch: Mapping[str, Any],
              namespace: str | None = None, subresource: str | None = None) -> dict[str, Any]:
        return dict(self._call("PATCH", resource_path(plural, namespace, name, subresource),
                               dict(patch), "application/merge-patch+json"))

    def delete(self, plural: str, name: str, namespace: str | None = None) -> bool:
        try:
            self._call("DELETE", resource_path(plural, namespace, name))
        except ApiError as exc:
            if exc.status == 404:
                return False
            raise
        return True

"""Pure builders of the objects one WriteCache owns (no I/O; the reconciler applies them).

Per WriteCache ``NAME`` in namespace ``NS``:

- ConfigMap ``cistern-NAME-config``: ``node.yaml`` = ``render_node_config(...).to_dict()``;
- Secret ``cistern-NAME-control``: the bearer token for the daemons' mutating control calls;
- DaemonSet ``cistern-NAME``: the privileged cache daemons on the selected nodes;
- StorageClass (``spec.csi.storageClassName`` or ``cistern-NAME``, cluster-scoped, so it
  cannot carry an owner reference; the finalizer deletes it);
- per node, a drain guard: a tiny Pod bound to the node plus a PodDisruptionBudget that
  forbids evicting it, so ``kubectl drain``, the cluster autoscaler and Karpenter cannot
  finish emptying a node until the operator releases the guard (dirty bytes reached zero or
  the drain timed out).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from typing import Any

import yaml

from cistern.config import NodeConfig
from cistern.operator.patches import fingerprint
from cistern.operator.settings import OperatorSettings
from cistern.writecache import (
    CSI_DRIVER_NAME,
    WriteCacheSpec,
    render_node_config,
    storage_class_name,
)

__all__ = [
    "CONFIG_DIR",
    "CONFIG_HASH",
    "LABEL_NODE",
    "LABEL_ROLE",
    "LABEL_WRITECACHE",
    "TOKEN_DIR",
    "configmap",
    "control_secret",
    "daemonset",
    "guard_name",
    "guard_pdb",
    "guard_pod",
    "names",
    "node_config",
    "node_key",
    "storage_class",
]

LABEL_WRITECACHE = "cistern.dev/writecache"
LABEL_ROLE = "cistern.dev/role"
LABEL_NODE = "cistern.dev/node"
CONFIG_HASH = "cistern.dev/config-hash"
CONFIG_DIR = "/etc/cistern"
TOKEN_DIR = "/etc/cistern-control"
CACHE_DIR_IN_POD = "/var/lib/cistern/cache"
CONFIG_KEY = "node.yaml"


class Names:
    """Object names derived from a WriteCache name."""

    def __init__(self, name: str) -> None:
        self.writecache = name
        self.daemonset = f"cistern-{name}"
        self.configmap = f"cistern-{name}-config"
        self.secret = f"cistern-{name}-control"


def names(name: str) -> Names:
    return Names(name)


def labels(name: str, role: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "cistern",
        "app.kubernetes.io/component": role,
        "app.kubernetes.io/managed-by": "cistern-operator",
        LABEL_WRITECACHE: name,
        LABEL_ROLE: role,
    }


def owner_reference(body: Mapping[str, Any]) -> dict[str, Any]:
    meta = body["metadata"]
    return {
        "apiVersion": body.get("apiVersion", "cistern.dev/v1alpha1"),
        "kind": body.get("kind", "WriteCache"),
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _meta(body: Mapping[str, Any], name: str, role: str) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": body["metadata"]["namespace"],
        "labels": labels(body["metadata"]["name"], role),
        "ownerReferences": [owner_reference(body)],
    }


def node_config(name: str, spec: WriteCacheSpec, settings: OperatorSettings) -> NodeConfig:
    """The configuration every daemon of this WriteCache runs with (paths as seen in the pod)."""
    return render_node_config(
        name, spec, mount_root=settings.mount_root, cache_dir=CACHE_DIR_IN_POD,
        control=f"0.0.0.0:{settings.control_port}",
        control_token_file=f"{TOKEN_DIR}/token")


def configmap(body: Mapping[str, Any], config: NodeConfig) -> dict[str, Any]:
    name = body["metadata"]["name"]
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(body, names(name).configmap, "cache-node"),
        "data": {CONFIG_KEY: yaml.safe_dump(config.to_dict(), sort_keys=True)},
    }


def control_secret(body: Mapping[str, Any], token: str) -> dict[str, Any]:
    name = body["metadata"]["name"]
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": _meta(body, names(name).secret, "cache-node"),
        "stringData": {"token": token},
    }


def _credential_env(spec: WriteCacheSpec) -> list[dict[str, Any]]:
    secret = spec.object_store.credentials_secret
    if not secret:
        return []
    return [
        {"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key,
                                                      **({"optional": True} if optional else {})}}}
        for key, optional in (("AWS_ACCESS_KEY_ID", False), ("AWS_SECRET_ACCESS_KEY", False),
                              ("AWS_SESSION_TOKEN", True))
    ]


def daemonset(body: Mapping[str, Any], spec: WriteCacheSpec, config: NodeConfig,
              settings: OperatorSettings) -> dict[str, Any]:
    """The cache daemons: privileged for FUSE, the mount root shared Bidirectionally."""
    meta = body["metadata"]
    name, namespace = meta["name"], meta["namespace"]
    n = names(name)
    pod_labels = labels(name, "cache-node")
    selector = {LABEL_WRITECACHE: name, LABEL_ROLE: "cache-node"}
    host_cache = f"{spec.cache.host_path.rstrip('/')}/{namespace}/{name}"
    grace = int(min(spec.drain.timeout, 24 * 3600)) + 30
    pod_spec: dict[str, Any] = {
        "terminationGracePeriodSeconds": grace,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "nodeSelector": dict(spec.node_selector),
        "tolerations": [dict(t) for t in spec.tolerations],
        "containers": [{
            "name": "cache",
            "image": settings.daemon_image,
            "imagePullPolicy": settings.daemon_image_pull_policy,
            "command": ["cistern-node", "run", "--config", f"{CONFIG_DIR}/{CONFIG_KEY}"],
            "env": [{"name": "NODE_NAME",
                     "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                    *_credential_env(spec)],
            "ports": [{"name": "control", "containerPort": settings.control_port,
                       "protocol": "TCP"}],
            "readinessProbe": {
                "httpGet": {"path": "/status", "port": "control"},
                "periodSeconds": 10, "timeoutSeconds": 5, "failureThreshold": 3,
            },
            "resources": spec.resources or settings.daemon_resources,
            "securityContext": {"privileged": True},
            "volumeMounts": [
                {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
                {"name": "control-token", "mountPath": TOKEN_DIR, "readOnly": True},
                {"name": "cache", "mountPath": CACHE_DIR_IN_POD},
                {"name": "mounts", "mountPath": settings.mount_root,
                 "mountPropagation": "Bidirectional"},
                {"name": "fuse", "mountPath": "/dev/fuse"},
            ],
        }],
        "volumes": [
            {"name": "config", "configMap": {"name": n.configmap}},
            {"name": "control-token", "secret": {"secretName": n.secret, "defaultMode": 0o400}},
            {"name": "cache", "hostPath": {"path": host_cache, "type": "DirectoryOrCreate"}},
            {"name": "mounts", "hostPath": {"path": settings.mount_root,
                                            "type": "DirectoryOrCreate"}},
            {"name": "fuse", "hostPath": {"path": "/dev/fuse", "type": "CharDevice"}},
        ],
    }
    if settings.priority_class_name:
        pod_spec["priorityClassName"] = settings.priority_class_name
    return {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": _meta(body, n.daemonset, "cache-node"),
        "spec": {
            "selector": {"matchLabels": selector},
            "updateStrategy": {"type": "RollingUpdate",
                               "rollingUpdate": {"maxUnavailable": 1}},
            "template": {
                "metadata": {"labels": pod_labels,
                             "annotations": {CONFIG_HASH: fingerprint(config.to_dict())}},
                "spec": pod_spec,
            },
        },
    }


def storage_class(body: Mapping[str, Any], spec: WriteCacheSpec) -> dict[str, Any]:
    meta = body["metadata"]
    return {
        "apiVersion": "storage.k8s.io/v1",
        "kind": "StorageClass",
        "metadata": {
            "name": storage_class_name(meta["name"], spec),
            "labels": {**labels(meta["name"], "storage-class"),
                       "cistern.dev/writecache-namespace": meta["namespace"]},
        },
        "provisioner": CSI_DRIVER_NAME,
        "parameters": {"writeCache": meta["name"]},
        "reclaimPolicy": spec.csi.reclaim_policy,
        "volumeBindingMode": "WaitForFirstConsumer",
        "allowVolumeExpansion": False,
    }


def topology_label(name: str) -> str:
    """The node label ``csi.cistern.dev/<writecache>``: the topology key the CSI node plugin
    reports (value ``"true"``) for a WriteCache whose cache it finds on the node."""
    return f"{CSI_DRIVER_NAME}/{name}"


def node_matches(node: Mapping[str, Any], selector: Mapping[str, str]) -> bool:
    """Whether a Node's labels satisfy a WriteCache's ``nodeSelector`` (empty: every node)."""
    node_labels = (node.get("metadata") or {}).get("labels") or {}
    return all(node_labels.get(key) == value for key, value in selector.items())


def node_key(node: str) -> str:
    """A label-value-safe key for a node name (names longer than 40 characters are hashed)."""
    if len(node) <= 40 and re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", node):
        return node
    return hashlib.sha256(node.encode()).hexdigest()[:16]


def guard_name(name: str, node: str) -> str:
    return f"cistern-guard-{name}-{node_key(node)}"[:253]


def _guard_labels(name: str, node: str) -> dict[str, str]:
    return {**labels(name, "drain-guard"), LABEL_NODE: node_key(node)}


def guard_pod(body: Mapping[str, Any], node: str, settings: OperatorSettings) -> dict[str, Any]:
    """A pause pod bound to ``node`` that the guard PDB forbids evicting."""
    name = body["metadata"]["name"]
    meta = _meta(body, guard_name(name, node), "drain-guard")
    meta["labels"] = _guard_labels(name, node)
    meta["annotations"] = {"cistern.dev/node-name": node}
    spec: dict[str, Any] = {
        "nodeName": node,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": 0,
        "tolerations": [{"operator": "Exists"}],
        "securityContext": {"runAsNonRoot": True, "runAsUser": 65535,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [{
            "name": "guard",
            "image": settings.guard_image,
            "resources": {"requests": {"cpu": "1m", "memory": "4Mi"},
                          "limits": {"memory": "16Mi"}},
            "securityContext": {"allowPrivilegeEscalation": False,
                                "readOnlyRootFilesystem": True,
                                "capabilities": {"drop": ["ALL"]}},
        }],
    }
    if settings.priority_class_name:
        spec["priorityClassName"] = settings.priority_class_name
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec}


def guard_pdb(body: Mapping[str, Any], node: str) -> dict[str, Any]:
    """Refuses every eviction of the node's guard pod while it exists."""
    name = body["metadata"]["name"]
    meta = _meta(body, guard_name(name, node), "drain-guard")
    meta["labels"] = _guard_labels(name, node)
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": meta,
        "spec": {"maxUnavailable": 0,
                 "selector": {"matchLabels": {LABEL_WRITECACHE: name, LABEL_ROLE: "drain-guard",
                                              LABEL_NODE: node_key(node)}}},
    }

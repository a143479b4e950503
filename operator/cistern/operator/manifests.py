"""Pure builders of the objects one WriteCache owns (no I/O; the reconciler applies them).

Per WriteCache ``NAME`` in namespace ``NS``, with ``KEY`` = ``cache_key(NS, NAME)``
(``NS.NAME``, bounded; unique across namespaces):

- in the operator's own namespace (the workload namespace, never the tenant's: the daemons are
  privileged), labelled ``cistern.dev/writecache=NAME`` and
  ``cistern.dev/writecache-namespace=NS`` (no owner reference can cross namespaces; the
  finalizer deletes them):

  - ConfigMap ``cistern-KEY-config``: ``node.yaml`` = ``render_node_config(...).to_dict()``;
  - Secret ``cistern-KEY-control``: the bearer token for the daemons' mutating control calls;
  - Secret ``cistern-KEY-credentials``: a copy of the tenant's credentials Secret, kept in sync;
  - DaemonSet ``cistern-KEY``: the privileged cache daemons on the selected nodes;
  - with ``spec.s3Endpoint.enabled`` (built in ``s3endpoint``): Secret
    ``cistern-KEY-s3-credentials`` (a copy of the tenant's endpoint keys, mounted at
    ``S3_CREDENTIALS_DIR``) and Service ``Names.s3_service`` (``internalTrafficPolicy:
    Local``: a pod reaches the endpoint of its own node only);
  - when ``spec.durability`` uses peer copies (built in ``peernet``): Secret
    ``cistern-KEY-peer-token`` (the daemons' shared peer token) and ConfigMap
    ``cistern-KEY-peers`` (``members.json``: the daemon pods' node names, IPs and peer port),
    mounted at ``PEER_TOKEN_DIR`` and ``PEERS_DIR``;
  - the entry ``KEY.json`` of the ConfigMap ``cistern-access``: the namespaces that may use the
    cache, read by the CSI driver;

- StorageClass (``spec.csi.storageClassName`` or ``cistern-NAME``, cluster-scoped, so it
  cannot carry an owner reference; the finalizer deletes it);
- per node, in ``NS``, a drain guard: a tiny unprivileged Pod bound to the node plus a
  PodDisruptionBudget that forbids evicting it, so ``kubectl drain``, the cluster autoscaler
  and Karpenter cannot finish emptying a node until the operator releases the guard (dirty
  bytes reached zero or the bounded drain timed out).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any

import yaml

from cistern.config import NodeConfig
from cistern.operator.patches import fingerprint
from cistern.operator.settings import OperatorSettings
from cistern.operator.tenancy import CONTROL_PLANE_LABELS
from cistern.writecache import (
    CSI_DRIVER_NAME,
    WriteCacheSpec,
    cache_key,
    render_node_config,
    storage_class_name,
)

__all__ = [
    "ACCESS_CONFIGMAP",
    "CONFIG_DIR",
    "CONFIG_HASH",
    "CREDENTIAL_KEYS",
    "LABEL_NAMESPACE",
    "LABEL_NODE",
    "LABEL_ROLE",
    "LABEL_WRITECACHE",
    "PEERS_DIR",
    "PEER_TOKEN_DIR",
    "S3_CREDENTIALS_DIR",
    "TOKEN_DIR",
    "access_policy",
    "configmap",
    "control_secret",
    "credentials_secret",
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
LABEL_NAMESPACE = "cistern.dev/writecache-namespace"
ACCESS_CONFIGMAP = "cistern-access"
CREDENTIAL_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")

CONFIG_HASH = "cistern.dev/config-hash"
CONFIG_DIR = "/etc/cistern"
TOKEN_DIR = "/etc/cistern-control"
S3_CREDENTIALS_DIR = "/etc/cistern-s3"
PEERS_DIR = "/etc/cistern-peers"
PEER_TOKEN_DIR = "/etc/cistern-peer-token"
CACHE_DIR_IN_POD = "/var/lib/cistern/cache"
CONFIG_KEY = "node.yaml"
HOLDER_SOCKET = "holder.sock"
HANDOFF_GRACE_SECONDS = 30


class Names:
    """Object names derived from a WriteCache's namespace and name (see ``cache_key``)."""

    def __init__(self, name: str, namespace: str) -> None:
        self.writecache = name
        self.namespace = namespace
        self.key = cache_key(namespace, name)
        self.daemonset = f"cistern-{self.key}"
        self.configmap = f"cistern-{self.key}-config"
        self.secret = f"cistern-{self.key}-control"
        self.credentials = f"cistern-{self.key}-credentials"
        self.s3_credentials = f"cistern-{self.key}-s3-credentials"
        self.peer_token = f"cistern-{self.key}-peer-token"
        self.peer_members = f"cistern-{self.key}-peers"
        # A Service name is a DNS-1035 label (no dots, 63 characters): a readable prefix and a
        # hash of namespace/name, so two WriteCaches never share one.
        digest = hashlib.sha256(f"{namespace}/{name}".encode()).hexdigest()[:10]
        readable = re.sub(r"[^a-z0-9-]", "-", f"{namespace}-{name}")[:40].strip("-")
        self.s3_service = f"cistern-s3-{readable}-{digest}"


def names(name: str, namespace: str) -> Names:
    return Names(name, namespace)


def labels(name: str, role: str, namespace: str | None = None) -> dict[str, str]:
    out = {
        "app.kubernetes.io/name": "cistern",
        "app.kubernetes.io/component": role,
        "app.kubernetes.io/managed-by": "cistern-operator",
        LABEL_WRITECACHE: name,
        LABEL_ROLE: role,
    }
    if namespace is not None:
        out[LABEL_NAMESPACE] = namespace
    return out


def workload_selector(name: str, namespace: str, role: str) -> dict[str, str]:
    """Labels that find one WriteCache's objects of ``role`` in the workload namespace."""
    return {LABEL_WRITECACHE: name, LABEL_NAMESPACE: namespace, LABEL_ROLE: role}


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


def _workload_meta(body: Mapping[str, Any], name: str, role: str,
                   settings: OperatorSettings) -> dict[str, Any]:
    """Metadata of an object in the workload namespace (no owner reference: other namespace)."""
    meta = body["metadata"]
    return {
        "name": name,
        "namespace": settings.workload_namespace,
        "labels": labels(meta["name"], role, meta["namespace"]),
    }


def names_of(body: Mapping[str, Any]) -> Names:
    return Names(body["metadata"]["name"], body["metadata"]["namespace"])


def node_config(name: str, namespace: str, spec: WriteCacheSpec,
                settings: OperatorSettings) -> NodeConfig:
    """The configuration every daemon of this WriteCache runs with (paths as seen in the pod)."""
    config = render_node_config(
        name, spec, namespace=namespace, mount_root=settings.mount_root,
        cache_dir=CACHE_DIR_IN_POD, control=f"0.0.0.0:{settings.control_port}",
        control_token_file=f"{TOKEN_DIR}/token", s3_credentials_dir=S3_CREDENTIALS_DIR,
        peer_members_dir=PEERS_DIR, peer_token_dir=PEER_TOKEN_DIR)
    if settings.fuse_holder_dir:
        # One holder per node keeps every cache's connection, keyed by the mount point
        # <mount_root>/<cache_key>, which cannot collide across namespaces.
        config = dataclasses.replace(config, fuse_holder=_holder_socket(settings))
    return config


def _holder_socket(settings: OperatorSettings) -> str:
    return f"{(settings.fuse_holder_dir or '').rstrip('/')}/{HOLDER_SOCKET}"


def configmap(body: Mapping[str, Any], config: NodeConfig,
              settings: OperatorSettings) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _workload_meta(body, names_of(body).configmap, "cache-node", settings),
        "data": {CONFIG_KEY: yaml.safe_dump(config.to_dict(), sort_keys=True)},
    }


def control_secret(body: Mapping[str, Any], token: str,
                   settings: OperatorSettings) -> dict[str, Any]:
    return token_secret(body, names_of(body).secret, "cache-node", token, settings)


def token_secret(body: Mapping[str, Any], name: str, role: str, token: str,
                 settings: OperatorSettings) -> dict[str, Any]:
    """A Secret in the workload namespace whose key ``token`` is ``token``."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": _workload_meta(body, name, role, settings),
        "stringData": {"token": token},
    }


def credentials_secret(body: Mapping[str, Any], source: Mapping[str, Any],
                       settings: OperatorSettings) -> dict[str, Any]:
    """The workload namespace's copy of the tenant's credentials Secret (only the AWS keys,
    still base64 as read)."""
    data = source.get("data") or {}
    meta = _workload_meta(body, names_of(body).credentials, "credentials", settings)
    meta["annotations"] = {"cistern.dev/copied-from":
                           f"{body['metadata']['namespace']}/"
                           f"{(source.get('metadata') or {}).get('name', '')}"}
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": meta,
        "data": {k: data[k] for k in CREDENTIAL_KEYS if k in data},
    }


def access_policy(body: Mapping[str, Any], spec: WriteCacheSpec,
                  selected: list[str]) -> tuple[str, str]:
    """``(key, json)`` of this cache's entry in the ``cistern-access`` ConfigMap: its own
    namespace, ``spec.access.namespaces`` and the namespaces its selector matched."""
    meta = body["metadata"]
    allowed = sorted({meta["namespace"], *spec.access.namespaces, *selected})
    policy = {"writeCache": f"{meta['namespace']}/{meta['name']}", "namespaces": allowed}
    return f"{names_of(body).key}.json", json.dumps(policy, sort_keys=True)


def _credential_env(body: Mapping[str, Any], spec: WriteCacheSpec) -> list[dict[str, Any]]:
    if not spec.object_store.credentials_secret:
        return []
    secret = names_of(body).credentials
    return [
        {"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key,
                                                      **({"optional": True} if optional else {})}}}
        for key, optional in zip(CREDENTIAL_KEYS, (False, False, True), strict=True)
    ]


def _no_control_plane() -> dict[str, Any]:
    """Node affinity that keeps the daemons off control-plane nodes."""
    return {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": [
            {"key": key, "operator": "DoesNotExist"} for key in CONTROL_PLANE_LABELS]}]}}}


def daemonset(body: Mapping[str, Any], spec: WriteCacheSpec, config: NodeConfig,
              settings: OperatorSettings) -> dict[str, Any]:
    """The cache daemons: privileged for FUSE, the mount root shared Bidirectionally; in the
    workload namespace, never the tenant's."""
    meta = body["metadata"]
    name, namespace = meta["name"], meta["namespace"]
    n = names_of(body)
    pod_labels = labels(name, "cache-node", namespace)
    selector = workload_selector(name, namespace, "cache-node")
    host_cache = f"{spec.cache.host_path.rstrip('/')}/{namespace}/{name}"
    grace = int(min(spec.drain.timeout, 24 * 3600)) + 30
    if settings.fuse_holder_dir:
        # With a holder, SIGTERM hands the connection off and exits at once (no drain, no
        # unmount); the node drain goes through the control API, not SIGTERM.
        grace = HANDOFF_GRACE_SECONDS
    pod_spec: dict[str, Any] = {
        "terminationGracePeriodSeconds": grace,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "nodeSelector": dict(spec.node_selector),
        "tolerations": [dict(t) for t in spec.tolerations],
        "affinity": _no_control_plane(),
        "containers": [{
            "name": "cache",
            "image": settings.daemon_image,
            "imagePullPolicy": settings.daemon_image_pull_policy,
            "command": ["cistern-node", "run", "--config", f"{CONFIG_DIR}/{CONFIG_KEY}"],
            "env": [{"name": "NODE_NAME",
                     "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                    *_credential_env(body, spec)],
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
    if settings.fuse_holder_dir:  # the holder's socket directory (the holder runs elsewhere)
        pod_spec["containers"][0]["volumeMounts"].append(
            {"name": "fuse-holder", "mountPath": settings.fuse_holder_dir})
        pod_spec["volumes"].append({"name": "fuse-holder", "hostPath": {
            "path": settings.fuse_holder_dir, "type": "DirectoryOrCreate"}})
    if spec.s3_endpoint.enabled:
        _add_s3_endpoint(pod_spec, spec, n)
    if spec.durability.uses_peers:
        _add_peer_network(pod_spec, spec, n)
    if settings.priority_class_name:
        pod_spec["priorityClassName"] = settings.priority_class_name
    return {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": _workload_meta(body, n.daemonset, "cache-node", settings),
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


def _add_s3_endpoint(pod_spec: dict[str, Any], spec: WriteCacheSpec, n: Names) -> None:
    """The S3 endpoint's container port (the Service's target) and its keys, read-only."""
    container = pod_spec["containers"][0]
    container["ports"].append({"name": "s3", "containerPort": spec.s3_endpoint.port,
                               "protocol": "TCP"})
    container["volumeMounts"].append({"name": "s3-credentials",
                                      "mountPath": S3_CREDENTIALS_DIR, "readOnly": True})
    pod_spec["volumes"].append({"name": "s3-credentials", "secret": {
        "secretName": n.s3_credentials, "defaultMode": 0o400}})


def _add_peer_network(pod_spec: dict[str, Any], spec: WriteCacheSpec, n: Names) -> None:
    """The peer server's port, the node's name among the members (the Kubernetes node name,
    stable across pod replacements: copies are held per origin node), the token Secret and the
    members ConfigMap (a plain ConfigMap volume: updated in place, the daemon re-reads it)."""
    container = pod_spec["containers"][0]
    container["command"] = [*container["command"], "--peer-node-name", "$(NODE_NAME)"]
    container["ports"].append({"name": "peers", "containerPort": spec.peers.port,
                               "protocol": "TCP"})
    container["volumeMounts"] += [
        {"name": "peer-token", "mountPath": PEER_TOKEN_DIR, "readOnly": True},
        {"name": "peer-members", "mountPath": PEERS_DIR, "readOnly": True}]
    pod_spec["volumes"] += [
        {"name": "peer-token", "secret": {"secretName": n.peer_token, "defaultMode": 0o400}},
        {"name": "peer-members", "configMap": {"name": n.peer_members}}]


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
        "parameters": {"writeCache": meta["name"], "writeCacheNamespace": meta["namespace"]},
        "reclaimPolicy": spec.csi.reclaim_policy,
        "volumeBindingMode": "WaitForFirstConsumer",
        "allowVolumeExpansion": False,
    }


def topology_label(name: str, namespace: str) -> str:
    """The node label ``csi.cistern.dev/<cache-key>``: the topology key the CSI node plugin
    reports (value ``"true"``) for a cache it finds on the node; one per namespace and name."""
    return f"{CSI_DRIVER_NAME}/{cache_key(namespace, name)}"


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

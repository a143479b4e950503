"""One node of the emulated cluster: a kubelet double plus the controllers a test needs.

``Node`` polls the API server (KMock) and runs, as local processes, every pod that would run
on it: the pods of DaemonSets whose nodeSelector it matches, one replica of each Deployment,
and bare Pods bound to it (or schedulable to it: it plays the scheduler's volume binding for
WaitForFirstConsumer claims). It writes pod status (podIP, Ready, restart counts, the last
log lines of a crashing container) and DaemonSet/Deployment status back, as the kubelet and
the controllers do. Third-party images become the test doubles in ``doubles/``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sys
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from support.kubelet.apiclient import ApiClient, ApiError, write_kubeconfig
from support.kubelet.containers import Container
from support.kubelet.csi_kubelet import CsiKubelet
from support.kubelet.pods import (
    PodContext,
    PodError,
    plan_containers,
    prepare_volumes,
    refresh_volumes,
)

__all__ = ["DOUBLES", "Node", "RunningPod"]

log = logging.getLogger(__name__)
TESTS_DIR = Path(__file__).resolve().parents[2]

#: image repository suffix -> the module that stands in for it (run with the container's args)
DOUBLES = {
    "csi-node-driver-registrar": "support.kubelet.doubles.registrar",
    "csi-provisioner": "support.kubelet.doubles.provisioner",
    "pause": "support.kubelet.doubles.pause",
}


def double_command(container: dict[str, Any]) -> list[str] | None:
    repository = str(container.get("image", "")).rsplit(":", 1)[0]
    for suffix, module in DOUBLES.items():
        if repository.endswith("/" + suffix) or repository == suffix:
            return [sys.executable, "-m", module]
    return None


@dataclass
class RunningPod:
    key: tuple[str, str]
    ctx: PodContext
    containers: dict[str, Container] = field(default_factory=dict)
    error: PodError | None = None
    owner: str = ""
    template_hash: str = ""
    volumes: dict[str, Path] = field(default_factory=dict)

    @property
    def ready(self) -> bool:
        return bool(self.containers) and all(c.state.ready for c in self.containers.values())

    def container(self, name: str) -> Container:
        return self.containers[name]


def _template_hash(template: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()[:10]


class Node:
    def __init__(self, api: ApiClient, name: str, root: Path, *, time_scale: float = 0.1,
                 labels: dict[str, str] | None = None, kubelet_dir: str = "/var/lib/kubelet",
                 poll: float = 0.1) -> None:
        self.api = api
        self.name = name
        self.root = root
        self.scale = time_scale
        self.labels = labels or {}
        self.poll = poll
        self.kubeconfig = write_kubeconfig(root / "kubeconfig", api.server)
        self.csi = CsiKubelet(api, root / "host", kubelet_dir)
        self.pods: dict[tuple[str, str], RunningPod] = {}
        self.errors: list[str] = []
        prefix = int.from_bytes(os.urandom(2), "big")
        self._ip_base = f"127.{64 + prefix % 128}.{prefix >> 8}"
        self._next_ip = 2
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name=f"node-{name}")

    # ----------------------------------------------------------------- public

    def start(self) -> None:
        for sub in ("pods", "plugins", "plugins_registry"):  # what a kubelet creates
            (self.csi.kubelet_dir / sub).mkdir(parents=True, exist_ok=True)
        self.api.create("nodes", {"apiVersion": "v1", "kind": "Node", "metadata": {
            "name": self.name, "labels": {"kubernetes.io/hostname": self.name, **self.labels}},
            "spec": {}, "status": {"conditions": [{"type": "Ready", "status": "True"}]}})
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)
        for key in list(self.pods):
            self._stop_pod(key, delete_object=False)

    def pod(self, namespace: str, name: str) -> RunningPod | None:
        return self.pods.get((namespace, name))

    def pods_with(self, labels: dict[str, str]) -> list[RunningPod]:
        return [p for p in self.pods.values() if all(
            (p.ctx.pod["metadata"].get("labels") or {}).get(k) == v for k, v in labels.items())]

    def describe(self) -> str:
        """Every pod, its containers' states and last log lines (for failure messages)."""
        lines = []
        for (ns, name), pod in sorted(self.pods.items()):
            lines.append(f"pod {ns}/{name}: {'ready' if pod.ready else 'not ready'}"
                         + (f" ({pod.error})" if pod.error else ""))
            for cname, c in pod.containers.items():
                s = c.state
                lines.append(f"  {cname}: running={s.running} ready={s.ready} "
                             f"restarts={s.restarts} last={s.last_reason}/{s.last_exit_code}")
                lines.extend("    | " + line for line in c.tail(8).splitlines())
        return "\n".join(lines + [f"node error: {e}" for e in self.errors[-5:]])

    # ----------------------------------------------------------------- loop

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._sync()
            except Exception as exc:  # the node keeps running; describe() shows the error
                if not self._stop.is_set():
                    self.errors.append(f"{type(exc).__name__}: {exc}")
                    log.exception("pod runner node %s: sync failed", self.name)
            self._stop.wait(self.poll)

    def _node_object(self) -> dict[str, Any]:
        return self.api.get("nodes", self.name) or {"metadata": {"labels": {}}, "spec": {}}

    def _fits(self, spec: dict[str, Any], node: dict[str, Any]) -> bool:
        labels = node["metadata"].get("labels") or {}
        return all(labels.get(k) == v for k, v in (spec.get("nodeSelector") or {}).items())

    def _sync(self) -> None:
        node = self._node_object()
        wanted: dict[tuple[str, str], tuple[dict[str, Any], str, str]] = {}
        for ds in self.api.list("daemonsets"):
            meta, template = ds["metadata"], ds["spec"]["template"]
            fits = self._fits(template["spec"], node)
            name = f"{meta['name']}-{hashlib.sha256(self.name.encode()).hexdigest()[:5]}"
            if fits:
                wanted[meta["namespace"], name] = (template, f"DaemonSet/{meta['name']}",
                                                   _template_hash(template))
            self._ds_status(ds, fits)
        for deploy in self.api.list("deployments"):
            meta, template = deploy["metadata"], deploy["spec"]["template"]
            if int(deploy["spec"].get("replicas", 1)) > 0 and self._fits(template["spec"], node):
                wanted[meta["namespace"], f"{meta['name']}-0"] = (
                    template, f"Deployment/{meta['name']}", _template_hash(template))
            self._deploy_status(deploy)
        api_pods = {(p["metadata"]["namespace"], p["metadata"]["name"]): p
                    for p in self.api.list("pods")}
        # Controller-owned pods: stop what is no longer wanted or whose template changed; a
        # deleted pod object is stopped and created anew (a new pod: volumes, env and
        # ConfigMap files are read again).
        for key, pod in list(self.pods.items()):
            if pod.owner and (key not in wanted or wanted[key][2] != pod.template_hash
                              or key not in api_pods):
                self._stop_pod(key, delete_object=key in api_pods)
        for key, (template, owner, digest) in wanted.items():
            if key not in self.pods:
                self._create_owned_pod(key, template, owner, digest)
        # Bare pods: bound here, or schedulable here.
        bare = {key: p for key, p in api_pods.items()
                if not (p["metadata"].get("labels") or {}).get("pod-runner/owner")}
        for key, pod in list(self.pods.items()):
            if not pod.owner and key not in bare:
                self._stop_pod(key, delete_object=False)
        for key, obj in bare.items():
            if key in self.pods:
                continue
            node_name = obj["spec"].get("nodeName")
            if node_name is None and self._fits(obj["spec"], node) and not (
                    node.get("spec") or {}).get("unschedulable"):
                self._schedule(obj)
            elif node_name == self.name:
                self._run_pod(key, obj, owner="", digest="")
        for pod in self.pods.values():
            if pod.error is None:
                refresh_volumes(pod.ctx, pod.volumes)
            self._pod_status(pod)

    # ----------------------------------------------------------------- pods

    def _pod_ip(self) -> str:
        self._next_ip += 1
        return f"{self._ip_base}.{self._next_ip}"

    def _create_owned_pod(self, key: tuple[str, str], template: dict[str, Any], owner: str,
                          digest: str) -> None:
        namespace, name = key
        labels = {**(template.get("metadata") or {}).get("labels", {}),
                  "pod-runner/owner": owner.replace("/", ".")}
        obj = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": name, "namespace": namespace, "labels": labels,
                            "uid": str(uuid.uuid4()),
                            "annotations": (template.get("metadata") or {}).get(
                                "annotations", {})},
               "spec": {**template["spec"], "nodeName": self.name}}
        with contextlib.suppress(ApiError):
            self.api.delete("pods", name, namespace)
        created = self.api.create("pods", obj, namespace)
        self._run_pod(key, created, owner=owner, digest=digest)

    def _root_ca(self, namespace: str) -> None:
        """The root-CA publisher's ConfigMap, which every namespace has (the emulator serves
        plain HTTP, so it holds no certificate)."""
        if self.api.get("configmaps", "kube-root-ca.crt", namespace) is None:
            with contextlib.suppress(ApiError):
                self.api.create("configmaps", {
                    "apiVersion": "v1", "kind": "ConfigMap",
                    "metadata": {"name": "kube-root-ca.crt", "namespace": namespace},
                    "data": {"ca.crt": ""}}, namespace)

    def _run_pod(self, key: tuple[str, str], obj: dict[str, Any], owner: str,
                 digest: str) -> None:
        self._root_ca(key[0])
        obj["metadata"].setdefault("uid", str(uuid.uuid4()))
        ctx = PodContext(pod=obj, node_name=self.name, pod_ip=self._pod_ip(), root=self.root,
                         api=self.api, kubeconfig=self.kubeconfig, publish=self.csi.publish)
        running = RunningPod(key=key, ctx=ctx, owner=owner, template_hash=digest)
        self.pods[key] = running
        self._start_containers(running)

    def _start_containers(self, pod: RunningPod) -> None:
        ctx = pod.ctx
        try:
            volumes = prepare_volumes(ctx)
            base_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(ctx.pod_dir),
                        "LANG": "C.UTF-8", "KUBECONFIG": str(ctx.kubeconfig),
                        "PYTHONPATH": os.pathsep.join(
                            [p for p in (os.environ.get("PYTHONPATH"), str(TESTS_DIR)) if p])}
            plans = plan_containers(ctx, volumes, base_env, double_command)
        except PodError as exc:
            pod.error = exc
            return
        pod.error = None
        pod.volumes = volumes
        restart = ctx.spec.get("restartPolicy", "Always")
        grace = float(ctx.spec.get("terminationGracePeriodSeconds", 30))
        logs = ctx.pod_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        for plan in plans:
            container = Container(plan, ctx.pod_ip, logs / f"{plan.name}.log", restart,
                                  self.scale, grace_seconds=min(grace, 60.0))
            pod.containers[plan.name] = container
            container.start()

    def _stop_pod(self, key: tuple[str, str], delete_object: bool) -> None:
        pod = self.pods.pop(key)
        for container in pod.containers.values():
            container.stop()
        errors = self.csi.unpublish_pod(pod.ctx.uid)
        self.errors.extend(errors)
        if delete_object:
            with contextlib.suppress(ApiError):
                self.api.delete("pods", key[1], key[0])

    def _schedule(self, pod: dict[str, Any]) -> None:
        """The scheduler's volume binding: pick this node for WaitForFirstConsumer claims,
        bind the pod once every claim is Bound."""
        meta = pod["metadata"]
        bound = True
        for volume in pod["spec"].get("volumes") or []:
            if "persistentVolumeClaim" not in volume:
                continue
            claim = volume["persistentVolumeClaim"]["claimName"]
            pvc = self.api.get("persistentvolumeclaims", claim, meta["namespace"])
            if pvc is None:
                return
            if (pvc.get("status") or {}).get("phase") != "Bound":
                bound = False
                annotations = pvc["metadata"].get("annotations") or {}
                if "volume.kubernetes.io/selected-node" not in annotations:
                    self.api.patch("persistentvolumeclaims", claim, {"metadata": {
                        "annotations": {"volume.kubernetes.io/selected-node": self.name}}},
                        meta["namespace"])
        if bound:
            self.api.patch("pods", meta["name"], {"spec": {"nodeName": self.name}},
                           meta["namespace"])

    def _pod_status(self, pod: RunningPod) -> None:
        if pod.error is not None:
            # Volumes or config not there yet (a missing Secret): the kubelet retries.
            self._start_containers(pod)
        statuses = []
        for name, c in pod.containers.items():
            s = c.state
            entry: dict[str, Any] = {"name": name, "ready": s.ready, "restartCount": s.restarts,
                                     "state": {"running": {}} if s.running else {"waiting": {
                                         "reason": "CrashLoopBackOff"}}}
            if s.last_exit_code is not None:
                entry["lastState"] = {"terminated": {"exitCode": s.last_exit_code,
                                                     "reason": s.last_reason,
                                                     "message": s.last_log[-2000:]}}
            statuses.append(entry)
        finished = pod.containers and all(c.state.finished for c in pod.containers.values())
        if pod.error is not None:
            phase = "Pending"
        elif finished:
            phase = "Succeeded" if all(c.state.last_exit_code == 0
                                       for c in pod.containers.values()) else "Failed"
        else:
            phase = "Running"
        status = {"phase": phase, "podIP": pod.ctx.pod_ip, "hostIP": "127.0.0.1",
                  "conditions": [{"type": "Ready", "status": "True" if pod.ready else "False"}],
                  "containerStatuses": statuses}
        if pod.error is not None:
            status["reason"], status["message"] = pod.error.reason, pod.error.message
        if status != pod.ctx.pod.get("status"):
            pod.ctx.pod["status"] = status
            with contextlib.suppress(ApiError):
                self.api.patch("pods", pod.key[1], {"status": status}, pod.key[0], "status")

    def _ds_status(self, ds: dict[str, Any], fits: bool) -> None:
        meta = ds["metadata"]
        pods = [p for p in self.pods.values() if p.owner == f"DaemonSet/{meta['name']}"
                and p.key[0] == meta["namespace"]]
        ready = sum(1 for p in pods if p.ready)
        status = {"desiredNumberScheduled": int(fits), "currentNumberScheduled": len(pods),
                  "updatedNumberScheduled": len(pods), "numberReady": ready,
                  "numberAvailable": ready, "numberMisscheduled": 0,
                  "observedGeneration": meta.get("generation", 1)}
        if any((ds.get("status") or {}).get(k) != v for k, v in status.items()):
            self.api.patch("daemonsets", meta["name"], {"status": status}, meta["namespace"],
                           "status")

    def _deploy_status(self, deploy: dict[str, Any]) -> None:
        meta = deploy["metadata"]
        pods = [p for p in self.pods.values() if p.owner == f"Deployment/{meta['name']}"
                and p.key[0] == meta["namespace"]]
        ready = sum(1 for p in pods if p.ready)
        status = {"replicas": len(pods), "readyReplicas": ready, "availableReplicas": ready,
                  "observedGeneration": meta.get("generation", 1)}
        if any((deploy.get("status") or {}).get(k) != v for k, v in status.items()):
            self.api.patch("deployments", meta["name"], {"status": status}, meta["namespace"],
                           "status")


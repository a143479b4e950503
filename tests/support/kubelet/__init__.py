"""A pod runner for tests: the kubelet (and the few controllers a test needs) as a double.

It runs the pods the chart renders and the operator writes as local processes: env, volumes
(hostPath under a per-test root, ConfigMaps and Secrets as files), probes, restarts with
backoff; third-party sidecars become small doubles making the same gRPC calls; the kubelet's
CSI calls publish PVCs and inline volumes with the pod info. See e2e/README.md for what it
cannot model.
"""

from support.kubelet.apiclient import ApiClient, ApiError, write_kubeconfig
from support.kubelet.containers import Container, ContainerState
from support.kubelet.csi_kubelet import POD_INFO_KEYS, CsiKubelet
from support.kubelet.node import Node, RunningPod
from support.kubelet.pods import PodError
from support.kubelet.tools import helm_template, tool

__all__ = ["POD_INFO_KEYS", "ApiClient", "ApiError", "Container", "ContainerState",
           "CsiKubelet", "Node", "PodError", "RunningPod", "helm_template", "tool",
           "write_kubeconfig"]

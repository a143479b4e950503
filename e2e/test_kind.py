"""End to end on a kind cluster: helm install, a WriteCache on an in-cluster S3, a pod writing a
checkpoint through a PVC, the objects in the bucket, and the volume deleted again.

The same steps a person would run (see e2e/README.md). Every step has a timeout; a failed step
reports the command, its output and the state of the cluster. Where Docker (with a running
engine), kind, kubectl or helm are missing, every test skips and prints which.

    python3 -m pytest e2e            # not part of the default run (testpaths = ["tests"])

Environment: CISTERN_E2E_KEEP=1 keeps the cluster after the run (kubeconfig path printed);
CISTERN_E2E_CLUSTER names it (default cistern-e2e); HELM points at a helm binary.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "cistern"
IMAGE = "cistern:e2e"
S3_IMAGE = "cistern-s3:e2e"
SYSTEM_NS = "cistern-system"
NS = "e2e"
WRITECACHE = "e2e-ckpt"
BUCKET = "e2e-checkpoints"
PREFIX = "runs"
CHECKPOINT_BYTES = 8 << 20
#: The content the trainer pod writes: deterministic, so the test knows its digest.
CHECKPOINT_SEED = "cistern-e2e"

pytestmark = pytest.mark.timeout(2400)


class StepFailed(AssertionError):
    """A step of the journey failed; the message carries the command and its output."""


def _helm_binary() -> str | None:
    candidates = [os.environ.get("HELM"), shutil.which("helm"),
                  str(ROOT / ".tools" / "helm-v3.17.2" / "helm")]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def missing_capabilities() -> list[str]:
    """What this machine lacks for the suite, each said exactly (empty: all there)."""
    missing = []
    docker = shutil.which("docker")
    if docker is None:
        missing.append("the docker CLI is not on PATH")
    else:
        info = subprocess.run([docker, "info", "--format", "{{.ServerVersion}}"],
                              capture_output=True, text=True, timeout=60)
        if info.returncode != 0 or not info.stdout.strip():
            reason = (info.stderr.strip().splitlines() or ["no server version"])[-1]
            missing.append(f"Docker has no running engine (`docker info`: {reason})")
    if shutil.which("kind") is None:
        missing.append("kind is not on PATH (https://kind.sigs.k8s.io)")
    if shutil.which("kubectl") is None:
        missing.append("kubectl is not on PATH")
    if _helm_binary() is None:
        missing.append("helm is not on PATH (nor $HELM, nor .tools/helm-v3.17.2/helm)")
    return missing


def _text(output: str | bytes | None) -> str:
    if isinstance(output, bytes):
        return output.decode(errors="replace")
    return output or ""


@dataclass
class Cluster:
    """A kind cluster and the tools to drive it."""

    name: str
    kubeconfig: Path
    helm: str

    def run(self, *command: str, timeout: float = 120, check: bool = True,
            stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig)}
        try:
            result = subprocess.run(list(command), capture_output=True, text=True, env=env,
                                    timeout=timeout, input=stdin)
        except subprocess.TimeoutExpired as exc:
            output = "\n".join(_text(part) for part in (exc.stdout, exc.stderr))
            raise StepFailed(f"timed out after {timeout:.0f}s: {' '.join(command)}\n"
                             f"{output}\n{self.diagnostics()}") from None
        if check and result.returncode != 0:
            raise StepFailed(f"exit {result.returncode}: {' '.join(command)}\n"
                             f"{result.stdout}\n{result.stderr}\n{self.diagnostics()}")
        return result

    def kubectl(self, *args: str, timeout: float = 120, check: bool = True,
                stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return self.run("kubectl", *args, timeout=timeout, check=check, stdin=stdin)

    def apply(self, *docs: dict[str, Any]) -> None:
        self.kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all(docs))

    def get(self, *args: str) -> dict[str, Any]:
        return dict(json.loads(self.kubectl("get", *args, "-o", "json").stdout))

    def diagnostics(self) -> str:
        """What a person would look at when a step fails (never raises)."""
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig)}
        out = []
        for command in (["kubectl", "get", "nodes", "--show-labels"],
                        ["kubectl", "get", "pods,pvc,pv,wc", "-A", "-o", "wide"],
                        ["kubectl", "get", "events", "-A", "--sort-by=.lastTimestamp"],
                        ["kubectl", "-n", SYSTEM_NS, "logs", "deploy/cistern-operator",
                         "--tail=60"],
                        ["kubectl", "-n", SYSTEM_NS, "logs", "ds/cistern-csi-node",
                         "--all-containers", "--tail=60"],
                        ["kubectl", "-n", NS, "logs", f"ds/cistern-{WRITECACHE}",
                         "--tail=60"]):
            try:
                result = subprocess.run(command, capture_output=True, text=True, env=env,
                                        timeout=30)
                out.append(f"$ {' '.join(command)}\n{result.stdout}{result.stderr}")
            except (OSError, subprocess.SubprocessError) as exc:
                out.append(f"$ {' '.join(command)}\n({exc})")
        return "\n--- cluster state ---\n" + "\n".join(out)


def wait_until(what: str, check: Callable[[], Any], timeout: float, cluster: Cluster,
               interval: float = 2.0) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except StepFailed as exc:
            last = str(exc).splitlines()[0]
        if last and not isinstance(last, str):
            return last
        time.sleep(interval)
    raise StepFailed(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})"
                     f"{cluster.diagnostics()}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    missing = missing_capabilities()
    if missing:
        reason = "kind e2e needs: " + "; ".join(missing)
        print(f"SKIP: {reason}", file=sys.stderr)
        pytest.skip(reason)
    helm = _helm_binary()
    assert helm is not None
    name = os.environ.get("CISTERN_E2E_CLUSTER", "cistern-e2e")
    kubeconfig = tmp_path_factory.mktemp("kind") / "kubeconfig"
    kind = Cluster(name, kubeconfig, helm)
    kind.run("kind", "create", "cluster", "--name", name, "--kubeconfig", str(kubeconfig),
             "--wait", "180s", timeout=600)
    try:
        yield kind
    finally:
        if os.environ.get("CISTERN_E2E_KEEP"):
            print(f"kept kind cluster {name}: KUBECONFIG={kubeconfig}", file=sys.stderr)
        else:
            kind.run("kind", "delete", "cluster", "--name", name, timeout=300, check=False)


@pytest.fixture(scope="module")
def installed(cluster: Cluster) -> Cluster:
    """Images built and loaded into the nodes, the chart installed and rolled out."""
    cluster.run("docker", "build", "-t", IMAGE, str(ROOT), timeout=1200)
    cluster.run("docker", "build", "-t", S3_IMAGE, "-f", str(ROOT / "e2e" / "s3.Dockerfile"),
                "--build-arg", f"BASE={IMAGE}", str(ROOT / "tests"), timeout=600)
    cluster.run("kind", "load", "docker-image", IMAGE, S3_IMAGE, "--name", cluster.name,
                timeout=600)
    repository, tag = IMAGE.split(":")
    cluster.run(cluster.helm, "install", "cistern", str(CHART), "--namespace", SYSTEM_NS,
                "--create-namespace", "--set", f"image.repository={repository}",
                "--set", f"image.tag={tag}", "--set", "image.pullPolicy=Never",
                "--set", "operator.verbose=true", "--wait", "--timeout", "10m",
                timeout=900)
    cluster.kubectl("-n", SYSTEM_NS, "rollout", "status", "ds/cistern-csi-node",
                    "--timeout=300s", timeout=330)
    return cluster


@contextlib.contextmanager
def port_forward(cluster: Cluster, namespace: str, target: str, port: int
                 ) -> Iterator[int]:
    """``kubectl port-forward`` to a local port; yields the local port."""
    from support.s3server import free_port, wait_for_port

    local = free_port()
    process = subprocess.Popen(
        ["kubectl", "-n", namespace, "port-forward", target, f"{local}:{port}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "KUBECONFIG": str(cluster.kubeconfig)})
    try:
        try:
            wait_for_port(local, timeout=60)
        except (OSError, TimeoutError, RuntimeError) as exc:
            process.kill()
            _, err = process.communicate(timeout=10)
            raise StepFailed(f"port-forward {target}: {exc}: {err}") from None
        yield local
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def s3_deployment() -> list[dict[str, Any]]:
    labels = {"app": "s3"}
    return [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}},
        {"apiVersion": "apps/v1", "kind": "Deployment",
         "metadata": {"name": "s3", "namespace": NS},
         "spec": {"replicas": 1, "selector": {"matchLabels": labels},
                  "template": {"metadata": {"labels": labels}, "spec": {"containers": [{
                      "name": "moto", "image": S3_IMAGE, "imagePullPolicy": "Never",
                      "command": ["python", "-m", "support.s3server",
                                  "--host", "0.0.0.0", "--port", "5000"],
                      "ports": [{"containerPort": 5000}],
                      "readinessProbe": {"tcpSocket": {"port": 5000},
                                         "periodSeconds": 2}}]}}}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s3", "namespace": NS},
         "spec": {"selector": labels, "ports": [{"port": 5000, "targetPort": 5000}]}},
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3-credentials",
                                                           "namespace": NS},
         "stringData": {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}},
    ]


def writecache(endpoint: str) -> dict[str, Any]:
    return {"apiVersion": "cistern.dev/v1alpha1", "kind": "WriteCache",
            "metadata": {"name": WRITECACHE, "namespace": NS},
            "spec": {"objectStore": {"bucket": BUCKET, "prefix": PREFIX, "endpoint": endpoint,
                                     "region": "us-east-1", "pathStyle": True,
                                     "credentialsSecretRef": {"name": "s3-credentials"}},
                     "cache": {"hostPath": "/var/lib/cistern/cache", "capacityBytes": "2Gi"},
                     "flush": {"uploadDelay": "1s"},
                     "csi": {"reclaimPolicy": "Delete"}}}


def trainer() -> list[dict[str, Any]]:
    script = (
        "import hashlib, os\n"
        f"block = hashlib.sha256(b{CHECKPOINT_SEED!r}).digest() * 1024\n"
        "os.makedirs('/checkpoints/step-1', exist_ok=True)\n"
        "with open('/checkpoints/step-1/shard-0.bin', 'wb') as f:\n"
        f"    for _ in range({CHECKPOINT_BYTES} // len(block)):\n"
        "        f.write(block)\n"
        "    f.flush()\n"
        "    os.fsync(f.fileno())\n"
        "with open('/checkpoints/step-1/.metadata', 'w') as f:\n"
        "    f.write('done')\n"
        "print('checkpoint written')\n")
    return [
        {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
         "metadata": {"name": "checkpoints", "namespace": NS},
         "spec": {"storageClassName": f"cistern-{WRITECACHE}", "accessModes": ["ReadWriteMany"],
                  "resources": {"requests": {"storage": "1Gi"}}}},
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "trainer", "namespace": NS},
         "spec": {"restartPolicy": "Never", "containers": [{
             "name": "trainer", "image": IMAGE, "imagePullPolicy": "Never",
             "command": ["python", "-c", script],
             "volumeMounts": [{"name": "checkpoints", "mountPath": "/checkpoints"}]}],
             "volumes": [{"name": "checkpoints",
                          "persistentVolumeClaim": {"claimName": "checkpoints"}}]}},
    ]


def expected_checkpoint() -> tuple[int, str]:
    block = hashlib.sha256(CHECKPOINT_SEED.encode()).digest() * 1024
    data = block * (CHECKPOINT_BYTES // len(block))
    return len(data), hashlib.sha256(data).hexdigest()


def test_checkpoint_through_a_pvc_lands_in_s3_and_delete_removes_it(installed: Cluster
                                                                    ) -> None:
    from support.s3server import s3_client

    cluster = installed
    # 1. An S3 inside the cluster, and its bucket (made through a port-forward).
    cluster.apply(*s3_deployment())
    cluster.kubectl("-n", NS, "rollout", "status", "deploy/s3", "--timeout=300s", timeout=330)
    cluster_ip = cluster.get("-n", NS, "service", "s3")["spec"]["clusterIP"]
    endpoint = f"http://{cluster_ip}:5000"  # the daemons may run on the host network
    with port_forward(cluster, NS, "service/s3", 5000) as local:
        s3 = s3_client(f"http://127.0.0.1:{local}")
        s3.create_bucket(Bucket=BUCKET)

        # 2. The WriteCache: daemons, StorageClass, node label, Ready.
        cluster.apply(writecache(endpoint))
        cluster.kubectl("-n", NS, "wait", f"writecache/{WRITECACHE}", "--for=condition=Ready",
                        "--timeout=420s", timeout=450)
        storage_class = cluster.get("storageclass", f"cistern-{WRITECACHE}")
        assert storage_class["provisioner"] == "csi.cistern.dev"
        assert storage_class["volumeBindingMode"] == "WaitForFirstConsumer"
        node_name = cluster.get("nodes")["items"][0]["metadata"]["name"]
        wait_until("the operator's node label",
                   lambda: cluster.get("node", node_name)["metadata"]["labels"].get(
                       f"csi.cistern.dev/{NS}.{WRITECACHE}") == "true" or None,
                   timeout=120, cluster=cluster)

        # 3. A trainer pod writes a checkpoint through a PVC.
        cluster.apply(*trainer())
        cluster.kubectl("-n", NS, "wait", "pod/trainer",
                        "--for=jsonpath={.status.phase}=Succeeded", "--timeout=420s",
                        timeout=450)
        assert "checkpoint written" in cluster.kubectl("-n", NS, "logs", "pod/trainer").stdout
        pvc = cluster.get("-n", NS, "pvc", "checkpoints")
        pv_name = pvc["spec"]["volumeName"]
        pv = cluster.get("pv", pv_name)
        volume_id = pv["spec"]["csi"]["volumeHandle"]
        assert volume_id.startswith(f"{NS}.{WRITECACHE}/{NS}/checkpoints-"), volume_id
        directory = volume_id.split("/", 1)[1]

        # 4. The objects are in the bucket, byte for byte.
        shard_key = f"{PREFIX}/{directory}/step-1/shard-0.bin"

        def uploaded() -> bool | None:
            keys = {o["Key"] for o in s3.list_objects_v2(
                Bucket=BUCKET, Prefix=f"{PREFIX}/{directory}/").get("Contents", [])}
            return {shard_key, f"{PREFIX}/{directory}/step-1/.metadata"} <= keys or None

        wait_until(f"s3://{BUCKET}/{shard_key}", uploaded, timeout=300, cluster=cluster)
        body = s3.get_object(Bucket=BUCKET, Key=shard_key)["Body"].read()
        size, digest = expected_checkpoint()
        assert (len(body), hashlib.sha256(body).hexdigest()) == (size, digest)

        def clean() -> bool | None:
            status = cluster.get("-n", NS, "writecache", WRITECACHE).get("status") or {}
            return (status.get("totals") or {}).get("dirtyBytes") == 0 or None

        wait_until("status.totals.dirtyBytes == 0", clean, timeout=120, cluster=cluster)

        # 5. Deleting the PVC deletes the volume (distributed provisioner, through the cache
        #    mount): the PV goes, and so do the directory's objects.
        cluster.kubectl("-n", NS, "delete", "pod/trainer", "--wait=true", timeout=180)
        cluster.kubectl("-n", NS, "delete", "pvc/checkpoints", "--wait=true", timeout=180)
        wait_until(f"PV {pv_name} deleted",
                   lambda: cluster.kubectl("get", "pv", pv_name, check=False)
                   .returncode != 0 or None, timeout=300, cluster=cluster)

        def objects_gone() -> bool | None:
            found = s3.list_objects_v2(Bucket=BUCKET, Prefix=f"{PREFIX}/{directory}/")
            return not found.get("Contents") or None

        wait_until("the volume's objects deleted", objects_gone, timeout=300, cluster=cluster)

        # 6. Deleting the WriteCache drains, removes its daemons and the node label.
        cluster.kubectl("-n", NS, "delete", f"writecache/{WRITECACHE}", "--wait=true",
                        "--timeout=300s", timeout=330)
        wait_until("the node label removed",
                   lambda: f"csi.cistern.dev/{NS}.{WRITECACHE}" not in cluster.get(
                       "node", node_name)["metadata"]["labels"] or None,
                   timeout=120, cluster=cluster)
        assert cluster.kubectl("get", "storageclass", f"cistern-{WRITECACHE}",
                               check=False).returncode != 0


def test_node_plugin_stays_up_without_a_cache(installed: Cluster) -> None:
    """No WriteCache on the node: the plugin is not restarted (liveness is /healthz)."""
    cluster = installed
    pods = cluster.get("-n", SYSTEM_NS, "pods", "-l",
                       "app.kubernetes.io/component=csi-node")["items"]
    assert pods, "no CSI node plugin pod"
    time.sleep(90)  # longer than the liveness probe would need to restart it 3 times
    for pod in cluster.get("-n", SYSTEM_NS, "pods", "-l",
                           "app.kubernetes.io/component=csi-node")["items"]:
        statuses = {s["name"]: s for s in pod["status"]["containerStatuses"]}
        assert statuses["csi-node"]["restartCount"] == 0, statuses["csi-node"]
        assert statuses["csi-node"]["ready"] is True


def test_manifests_the_suite_applies_are_valid(tmp_path: Path) -> None:
    """Runs everywhere (no cluster): what the journey applies passes the API server's schemas
    (kubernetes-validate, strict) and the WriteCache CRD's own schema."""
    import kubernetes_validate

    from cistern.operator.crdschema import crd_validator

    crd = yaml.safe_load((ROOT / "crds" / "writecaches.cistern.dev.yaml").read_text())
    schema = crd_validator(crd)
    docs = [*s3_deployment(), writecache("http://10.96.0.10:5000"), *trainer()]
    for doc in docs:
        if doc["apiVersion"].startswith("cistern.dev/"):
            errors = sorted(schema.iter_errors(doc), key=str)
            assert not errors, [e.message for e in errors]
        else:
            kubernetes_validate.validate(doc, "1.32.0", strict=True)
    script = trainer()[1]["spec"]["containers"][0]["command"][2]
    # The pod's program, run here on a plain directory, writes the bytes the test expects.
    subprocess.run([sys.executable, "-c", script.replace("/checkpoints", str(tmp_path))],
                   check=True, timeout=60, capture_output=True)
    written = (tmp_path / "step-1" / "shard-0.bin").read_bytes()
    assert (len(written), hashlib.sha256(written).hexdigest()) == expected_checkpoint()
    assert (tmp_path / "step-1" / ".metadata").read_text() == "done"

"""The operator with a real ``cistern-node``: it runs the configuration the operator rendered
(one schema), and a cordon drains real dirty data to a real S3 (moto) before the node is
released. Needs root and /dev/fuse for the FUSE mount."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from cistern.config import NodeConfig
from cistern.operator.kubeapi import CONFIGMAPS, DAEMONSETS, NODES, PDBS, PODS, SECRETS, WRITECACHES
from support.s3server import TEST_CREDENTIALS, MotoServer

from .conftest import NAMESPACE, WORKLOAD, Cluster, operator_settings, running_operator, wait_for

pytestmark = [
    pytest.mark.asyncio,
    pytest.mark.timeout(120),
    pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"),
                       reason="a real cistern-node needs root and /dev/fuse to mount"),
    pytest.mark.skipif(shutil.which("cistern-node") is None,
                       reason="the cistern-node entry point is not installed"),
]

DAEMON_HOST = "127.0.0.4"


def _mounted(path: Path) -> bool:
    with open("/proc/self/mounts") as mounts:
        return any(line.split()[1] == str(path) for line in mounts)


async def test_cordon_drains_a_real_daemon_to_s3(cluster: Cluster, tmp_path: Path) -> None:
    mount_root = tmp_path / "mounts"
    with MotoServer() as s3:
        await asyncio.to_thread(s3.client().create_bucket, Bucket="training-ckpt")
        await cluster.api.create(SECRETS, {
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3-creds"},
            "stringData": {"AWS_ACCESS_KEY_ID": TEST_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                           "AWS_SECRET_ACCESS_KEY": TEST_CREDENTIALS["AWS_SECRET_ACCESS_KEY"]}},
            NAMESPACE)
        settings = operator_settings(cluster, mount_root=str(mount_root), check_object_store=True)
        async with running_operator(cluster, settings):
            await cluster.api.create(WRITECACHES, {
                "apiVersion": "cistern.dev/v1alpha1", "kind": "WriteCache",
                "metadata": {"name": "ckpt", "namespace": NAMESPACE},
                "spec": {"objectStore": {"bucket": "training-ckpt", "prefix": "run1",
                                         "endpoint": s3.endpoint, "pathStyle": True,
                                         "region": "us-east-1",
                                         "credentialsSecretRef": {"name": "s3-creds"}},
                         "flush": {"uploadDelay": "1h"},  # stays dirty until the drain
                         "drain": {"timeout": "5m"}}}, NAMESPACE)
            cm = await wait_for(lambda: cluster.api.get(CONFIGMAPS, "cistern-ml.ckpt-config",
                                                        WORKLOAD), what="the ConfigMap")
            secret = await wait_for(lambda: cluster.api.get(SECRETS, "cistern-ml.ckpt-control",
                                                            WORKLOAD))
            ds = await wait_for(lambda: cluster.api.get(DAEMONSETS, "cistern-ml.ckpt", WORKLOAD))

            # The pod would mount the ConfigMap and the token; here the same files live in
            # tmp_path, and only the pod-local paths and the pod IP differ.
            rendered = NodeConfig.from_dict(yaml.safe_load(cm["data"]["node.yaml"]))
            token_file = tmp_path / "token"
            token_file.write_bytes(base64.b64decode(secret["data"]["token"]))
            local = dataclasses.replace(
                rendered, cache=dataclasses.replace(rendered.cache, dir=str(tmp_path / "cache")),
                control=f"{DAEMON_HOST}:{cluster.control_port}",
                control_token_file=str(token_file))
            (tmp_path / "node.yaml").write_text(yaml.safe_dump(local.to_dict()))
            mount = Path(rendered.mount)
            assert mount == mount_root / "ml.ckpt"
            # Only the DaemonSet's hostPath volume (the root) exists; the daemon makes the rest.
            mount_root.mkdir()
            env = {**os.environ, **TEST_CREDENTIALS}
            daemon = await asyncio.create_subprocess_exec(
                "cistern-node", "run", "--config", str(tmp_path / "node.yaml"),
                stdout=asyncio.subprocess.DEVNULL, stderr=(tmp_path / "daemon.log").open("w"),
                env=env)
            try:
                await wait_for(lambda: _mounted(mount), timeout=30, what="the FUSE mount")
                await cluster.api.create(PODS, {
                    "apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": "cistern-ckpt-node-a", "namespace": WORKLOAD,
                                 "labels": ds["spec"]["template"]["metadata"]["labels"]},
                    "spec": {"nodeName": "node-a", "containers": []},
                    "status": {"phase": "Running", "podIP": DAEMON_HOST,
                               "conditions": [{"type": "Ready", "status": "True"}]},
                }, WORKLOAD)
                guard = "cistern-guard-ckpt-node-a"
                await wait_for(lambda: cluster.api.get(PDBS, guard, NAMESPACE), what="guard")

                payload = os.urandom(4 * 2**20)
                await asyncio.to_thread(_write_checkpoint, mount / "step-1", payload)
                entry = await wait_for(lambda: _node(cluster, "node-a", 4 * 2**20 + 4),
                                       timeout=30, what="the daemon's dirty bytes in status")
                assert entry["phase"] == "Running"

                await cluster.api.patch(NODES, "node-a", {"spec": {"unschedulable": True}})
                await wait_for(lambda: _gone(cluster, guard), timeout=60,
                               what="the guard released after the real drain")
                head = await asyncio.to_thread(s3.client().get_object, Bucket="training-ckpt",
                                               Key="run1/step-1/shard-0.bin")
                assert head["Body"].read() == payload
                entry = await wait_for(lambda: _outcome(cluster, "node-a"), timeout=30)
                assert entry["drainOutcome"] == "Drained" and entry["dirtyBytes"] == 0
                assert entry["phase"] == "Drained"
            finally:
                if daemon.returncode is None:
                    daemon.terminate()
                    try:
                        await asyncio.wait_for(daemon.wait(), 30)
                    except TimeoutError:
                        daemon.kill()
                        await daemon.wait()
                if _mounted(mount):
                    with contextlib.suppress(OSError, subprocess.SubprocessError):
                        subprocess.run(["fusermount3", "-u", str(mount)], timeout=10)


def _write_checkpoint(directory: Path, payload: bytes) -> None:
    directory.mkdir()
    with open(directory / "shard-0.bin", "wb") as file:
        file.write(payload)
        file.flush()
        os.fsync(file.fileno())
    with open(directory / ".meta", "wb") as file:
        file.write(b"done")
        os.fsync(file.fileno())


def _node(cluster: Cluster, node: str, dirty: int) -> dict[str, Any] | None:
    status = (cluster.writecache("ckpt") or {}).get("status") or {}
    for entry in status.get("nodes") or []:
        if entry["node"] == node and entry.get("dirtyBytes") == dirty:
            return dict(entry)
    return None


def _outcome(cluster: Cluster, node: str) -> dict[str, Any] | None:
    status = (cluster.writecache("ckpt") or {}).get("status") or {}
    for entry in status.get("nodes") or []:
        if entry["node"] == node and entry.get("drainOutcome"):
            return dict(entry)
    return None


async def _gone(cluster: Cluster, name: str) -> bool:
    return await cluster.api.get(PDBS, name, NAMESPACE) is None

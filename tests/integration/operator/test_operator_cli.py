"""``cistern-operator`` as a process: kubeconfig credentials, JSON logs, clean SIGTERM exit."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import pytest
import yaml

from cistern.operator.kubeapi import DAEMONSETS, WRITECACHES

from .conftest import NAMESPACE, WORKLOAD, Cluster, wait_for

pytestmark = [pytest.mark.timeout(90)]


def test_help_lists_the_scope_flags() -> None:
    import subprocess

    out = subprocess.run(["cistern-operator", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for flag in ("--namespace", "--all-namespaces", "--standalone", "--daemon-image"):
        assert flag in out


@pytest.mark.asyncio
async def test_operator_process_uses_kubeconfig(cluster: Cluster, tmp_path: Path) -> None:
    server = str(cluster.kmock.url).rstrip("/")
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
        "clusters": [{"name": "emulator", "cluster": {"server": server}}],
        "users": [{"name": "tester", "user": {"token": "sekret-token"}}],
        "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "tester",
                                                       "namespace": NAMESPACE}}],
    }))
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_SERVICE")}
    env.update(KUBECONFIG=str(kubeconfig), HOME=str(tmp_path))
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cistern.operator.cli", "--all-namespaces", "--standalone",
        "--no-bucket-check", "--daemon-image", "example.com/cistern:9", "--log-format", "json",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env)
    try:
        await cluster.api.create(WRITECACHES, {
            "apiVersion": "cistern.dev/v1alpha1", "kind": "WriteCache",
            "metadata": {"name": "ckpt", "namespace": NAMESPACE},
            "spec": {"objectStore": {"bucket": "training-ckpt"}}}, NAMESPACE)
        ds = await wait_for(lambda: cluster.api.get(DAEMONSETS, "cistern-ml.ckpt", WORKLOAD),
                            timeout=30, what="the DaemonSet from the operator process")
        assert ds["spec"]["template"]["spec"]["containers"][0]["image"] == \
            "example.com/cistern:9"
        authorizations = {r.headers.get("Authorization") for r in cluster.kmock
                          if r.resource is not None}
        assert authorizations - {None} == {"Bearer sekret-token"}  # None: the test's client
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, output.decode()
    records = [json.loads(line) for line in output.decode().splitlines() if line.strip()]
    assert records and all("message" in r for r in records)
    assert "sekret-token" not in output.decode()

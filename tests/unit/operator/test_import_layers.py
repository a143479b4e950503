"""The import-linter contracts in pyproject.toml hold (components never import each other)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
COMPONENTS = {
    "cachenode": ROOT / "cachenode" / "cistern" / "cachenode",
    "operator": ROOT / "operator" / "cistern" / "operator",
    "csi": ROOT / "csi-driver" / "cistern" / "csi",
}


def test_lint_imports_contracts_are_kept(tmp_path: Path) -> None:
    # grimp walks one directory per package; the components live in their own folders
    # (mapped by setuptools package-dir), so assemble the `cistern` tree they form.
    tree = tmp_path / "cistern"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "common" / "cistern", tree, ignore=ignore)
    for name, source in COMPONENTS.items():
        shutil.copytree(source, tree / name, ignore=ignore)
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    lint_imports = shutil.which("lint-imports")
    assert lint_imports, "import-linter is not installed"
    result = subprocess.run([lint_imports, "--config", "pyproject.toml", "--no-cache"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout
    assert "Components do not import each other KEPT" in result.stdout

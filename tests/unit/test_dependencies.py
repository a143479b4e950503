"""The wheel's declared dependencies equal what its code imports (deptry, configured in
pyproject.toml under [tool.deptry]).

DEP001: imported, not declared. DEP002: declared, never imported. DEP003: imported, only
installed as another package's dependency. DEP004: imported by product code, declared only in
the test or bench extra. Any of them fails CI.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
#: The product code, the folders the wheel is built from (tests/ and bench/ are not shipped).
PRODUCT = ("common", "cachenode", "operator", "csi-driver")


def _deptry(cwd: Path, *paths: str, tmp_path: Path) -> tuple[int, list[dict[str, Any]], str]:
    report = tmp_path / "deptry.json"
    result = subprocess.run([sys.executable, "-m", "deptry", *paths, "--json-output",
                             str(report), "--no-ansi"], cwd=cwd, capture_output=True,
                            text=True, timeout=300)
    issues = json.loads(report.read_text()) if report.exists() else []
    return result.returncode, issues, result.stdout + result.stderr


def test_declared_dependencies_equal_the_imports_of_the_product_code(tmp_path: Path) -> None:
    code, issues, output = _deptry(ROOT, *PRODUCT, tmp_path=tmp_path)
    found = [f"{i['error']['code']} {i['module']} ({i['location']['file']})" for i in issues]
    assert code == 0 and not found, "\n".join(found) or output


def test_deptry_reports_each_kind_of_mismatch(tmp_path: Path) -> None:
    """The check above can fail: a small project with one mistake of each kind is caught."""
    project = tmp_path / "project"
    (project / "pkg").mkdir(parents=True)
    (project / "pyproject.toml").write_text(
        '[project]\nname = "pkg"\nversion = "0"\n'
        'dependencies = ["PyYAML", "grpcio"]\n'
        '[project.optional-dependencies]\ntest = ["pytest"]\n'
        '[tool.deptry]\noptional_dependencies_dev_groups = ["test"]\n')
    (project / "pkg" / "__init__.py").write_text(
        "import yaml\nimport surely_not_a_declared_module\nimport pytest\nimport botocore\n")
    code, issues, output = _deptry(project, "pkg", tmp_path=tmp_path)
    codes = {(i["error"]["code"], i["module"]) for i in issues}
    assert code != 0, output
    assert ("DEP001", "surely_not_a_declared_module") in codes, output
    assert ("DEP002", "grpcio") in codes, output
    assert ("DEP004", "pytest") in codes, output
    assert ("DEP003", "botocore") in codes, output

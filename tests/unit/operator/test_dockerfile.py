"""The image (Dockerfile) ships the three entry points the chart and the operator start."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def test_image_carries_every_console_script_the_chart_uses() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert {"cistern-operator", "cistern-csi", "cistern-node"} <= set(scripts)
    dockerfile = (ROOT / "Dockerfile").read_text()
    # Installs the distribution built from every component folder.
    for folder in ("common", "cachenode", "operator", "csi-driver"):
        assert re.search(rf"^COPY {folder} ", dockerfile, re.M), folder
    assert "pip install" in dockerfile and " cistern" in dockerfile
    templates = "".join(p.read_text() for p in (ROOT / "charts/cistern/templates").glob("*"))
    for command in ("cistern-operator", "cistern-csi"):
        assert f"command: [{command}]" in templates

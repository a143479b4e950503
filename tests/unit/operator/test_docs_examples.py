"""YAML shown in the docs is the real YAML from crds/examples/ (tagged with its path)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
TAGGED = re.compile(r"<!-- (crds/examples/[\w./-]+\.yaml) -->\n```yaml\n(.*?)```", re.S)
DOCS = [ROOT / "README.md", ROOT / "docs" / "operator.md"]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_tagged_yaml_blocks_match_the_example_files(doc: Path) -> None:
    tagged = TAGGED.findall(doc.read_text())
    assert tagged, f"{doc.name} shows no tagged example (<!-- crds/examples/... -->)"
    for path, block in tagged:
        assert block == (ROOT / path).read_text(), f"{doc.name}: {path} is out of date"


def test_operator_doc_walks_the_user_journey() -> None:
    text = (ROOT / "docs" / "operator.md").read_text()
    shown = {path for path, _ in TAGGED.findall(text)}
    assert {"crds/examples/writecache-minimal.yaml", "crds/examples/pvc-and-pod.yaml"} <= shown
    for step in ("helm install cistern charts/cistern", "kubectl get wc"):
        assert step in text

"""The WriteCache CRD: examples pass, nonsense is rejected with a readable message, and the
schema agrees with the shared spec parser (cistern.writecache) and node config (cistern.config)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from cistern.config import CacheConfig, ConfigError, DrainPolicy, FlushPolicy, NodeConfig
from cistern.operator.crdschema import crd_validator, openapi_to_jsonschema
from cistern.writecache import WriteCacheSpec, render_node_config

ROOT = Path(__file__).resolve().parents[3]
CRD_PATH = ROOT / "crds" / "writecaches.cistern.dev.yaml"
EXAMPLES = sorted((ROOT / "crds" / "examples").glob("*.yaml"))
INVALID = sorted((ROOT / "crds" / "examples" / "invalid").glob("*.yaml"))


@pytest.fixture(scope="module")
def crd() -> dict[str, Any]:
    return dict(yaml.safe_load(CRD_PATH.read_text()))


def spec_schema(crd: dict[str, Any]) -> dict[str, Any]:
    return dict(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"])


def writecaches(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d and d["kind"] == "WriteCache"]


def test_crd_identity(crd: dict[str, Any]) -> None:
    assert crd["metadata"]["name"] == "writecaches.cistern.dev"
    spec = crd["spec"]
    assert (spec["group"], spec["scope"], spec["names"]["shortNames"]) == (
        "cistern.dev", "Namespaced", ["wc"])
    (version,) = spec["versions"]
    assert version["name"] == "v1alpha1" and version["subresources"] == {"status": {}}
    columns = [c["name"] for c in version["additionalPrinterColumns"] if not c.get("priority")]
    assert columns == ["Ready", "Nodes", "Dirty", "Age"]


def test_patterns_are_re2_compatible(crd: dict[str, Any]) -> None:
    """The API server compiles patterns with Go's RE2: no look-arounds or back-references."""
    patterns = re.findall(r"pattern: '([^']*)'", CRD_PATH.read_text())
    assert patterns
    for pattern in patterns:
        assert "(?=" not in pattern and "(?!" not in pattern and "(?<" not in pattern
        assert not re.search(r"\\[1-9]", pattern)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_are_valid(crd: dict[str, Any], path: Path) -> None:
    validator = crd_validator(crd)
    docs = writecaches(path)
    for doc in docs:
        errors = [e.message for e in validator.iter_errors(doc)]
        assert not errors, errors
        # What the schema admits, the operator can render for the daemon.
        spec = WriteCacheSpec.from_dict(doc["spec"])
        config = render_node_config(doc["metadata"]["name"], spec)
        assert NodeConfig.from_dict(config.to_dict()) == config


def test_the_examples_cover_both_shapes() -> None:
    names = {p.name for p in EXAMPLES}
    assert {"writecache-minimal.yaml", "writecache-full.yaml"} <= names


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.name)
def test_invalid_examples_are_rejected_with_the_expected_message(
        crd: dict[str, Any], path: Path) -> None:
    expected = re.search(r"^# expect: (.+)$", path.read_text(), re.M)
    assert expected, f"{path.name} needs an '# expect: <message>' line"
    (doc,) = writecaches(path)
    errors = list(crd_validator(crd).iter_errors(doc))
    assert errors, f"{path.name} was accepted"
    readable = ["spec." + ".".join(str(p) for p in e.absolute_path if p != "spec")
                + ": " + e.message for e in errors]
    assert any(expected.group(1) in text for text in readable), readable
    # The handler re-checks: the same spec never reaches the daemons.
    with pytest.raises(ConfigError):
        WriteCacheSpec.from_dict(doc["spec"])


def test_flush_cache_and_drain_keys_match_the_node_config(crd: dict[str, Any]) -> None:
    schema = spec_schema(crd)["properties"]
    flush_keys = set(schema["flush"]["properties"])
    assert flush_keys == set(FlushPolicy().to_dict()) | {
        "maxBytesPerSecond", "maxRequestsPerSecond", "evacuationBytesPerSecond"}
    assert set(schema["drain"]["properties"]) == set(DrainPolicy().to_dict())
    config_cache_keys = set(CacheConfig(capacity_bytes=1, keep_last_checkpoints=1,
                                        cache_ttl=1.0).to_dict())
    cache_keys = set(schema["cache"]["properties"]) - {"hostPath"}
    retention_keys = set(schema["retention"]["properties"]) - {"keepLastCheckpointsInStore"}
    assert cache_keys | retention_keys == config_cache_keys - {"dir"}
    assert schema["flush"]["properties"]["mode"]["enum"] == ["writeBack", "writeThrough"]
    assert schema["drain"]["properties"]["newWrites"]["enum"] == ["hold", "reject"]


def test_schema_defaults_agree_with_the_parser(crd: dict[str, Any]) -> None:
    schema = spec_schema(crd)["properties"]
    parsed = WriteCacheSpec.from_dict({"objectStore": {"bucket": "abc"}})
    assert schema["flush"]["properties"]["mode"]["default"] == parsed.flush.mode
    assert schema["drain"]["properties"]["newWrites"]["default"] == parsed.drain.new_writes
    assert WriteCacheSpec.from_dict({"objectStore": {"bucket": "abc"}, "drain": {
        "timeout": schema["drain"]["properties"]["timeout"]["default"]}}).drain.timeout == \
        parsed.drain.timeout
    assert schema["cache"]["properties"]["hostPath"]["default"] == parsed.cache.host_path
    assert schema["csi"]["properties"]["reclaimPolicy"]["default"] == parsed.csi.reclaim_policy
    assert schema["retention"]["properties"]["checkpointPattern"]["default"] == \
        parsed.retention.checkpoint_pattern


@pytest.mark.parametrize(("field", "value", "message"), [
    (("objectStore", "endpoint"), "minio:9000", "does not match"),
    (("flush", "maxConcurrentUploads"), 0, "less than the minimum of 1"),
    (("flush", "uploadDelay"), "soon", "does not match"),
    (("csi", "reclaimPolicy"), "Recycle", "is not one of ['Delete', 'Retain']"),
    (("retention", "keepLastCheckpoints"), 0, "less than the minimum of 1"),
    (("cache", "hostPath"), "relative/dir", "does not match"),
    (("tolerations",), [{"operator": "Maybe"}], "is not one of ['Exists', 'Equal']"),
])
def test_schema_rejects_nonsense(crd: dict[str, Any], field: tuple[str, ...], value: Any,
                                 message: str) -> None:
    doc: dict[str, Any] = {"apiVersion": "cistern.dev/v1alpha1", "kind": "WriteCache",
                           "metadata": {"name": "x"},
                           "spec": {"objectStore": {"bucket": "my-bucket"}}}
    target = doc["spec"]
    for key in field[:-1]:
        target = target.setdefault(key, {})
    target[field[-1]] = value
    errors = [e.message for e in crd_validator(crd).iter_errors(doc)]
    assert any(message in e for e in errors), errors


def _walk(node: dict[str, Any], path: str) -> list[tuple[str, dict[str, Any]]]:
    found = [(path, node)]
    for key, child in (node.get("properties") or {}).items():
        found += _walk(child, f"{path}.{key}")
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            found += _walk(node[key], f"{path}[{key}]")
    return found


def test_schema_is_structural_and_defaults_are_valid(crd: dict[str, Any]) -> None:
    """What the API server demands of a CRD schema before it accepts the CRD."""
    root = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for path, node in _walk(root, "openAPIV3Schema"):
        untyped_ok = node.get("x-kubernetes-int-or-string") or \
            node.get("x-kubernetes-preserve-unknown-fields")
        assert "type" in node or untyped_ok, f"{path}: a structural schema needs a type"
        assert not ("properties" in node and "additionalProperties" in node), path
        if "default" in node:
            schema = openapi_to_jsonschema(node)
            errors = [e.message for e in jsonschema.Draft4Validator(schema).iter_errors(
                node["default"])]
            assert not errors, f"{path}: default {node['default']!r}: {errors}"
    metadata = root["properties"]["metadata"]
    assert metadata == {"type": "object"}  # no constraints on metadata beyond name

"""Check objects against a CRD's OpenAPI v3 schema offline, as the API server would.

The API server validates a custom resource against the CRD's structural schema, rejects
unknown fields (kubectl's default strict field validation) and treats
``x-kubernetes-int-or-string`` as "integer or string". This turns such a schema into a JSON
Schema (draft 4, the OpenAPI v3.0 dialect) for ``jsonschema``. CEL rules
(``x-kubernetes-validations``) are not evaluated here; the operator re-checks them.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import jsonschema

__all__ = ["crd_validator", "openapi_to_jsonschema"]


def openapi_to_jsonschema(schema: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = copy.deepcopy(dict(schema))
    _convert(out)
    return out


def _convert(node: dict[str, Any]) -> None:
    if node.get("x-kubernetes-int-or-string") and "type" not in node:
        node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("type") == "object" and "properties" in node \
            and "additionalProperties" not in node \
            and not node.get("x-kubernetes-preserve-unknown-fields"):
        node["additionalProperties"] = False
    for key in ("properties", "patternProperties"):
        for child in (node.get(key) or {}).values():
            _convert(child)
    for key in ("items", "additionalProperties", "not"):
        if isinstance(node.get(key), dict):
            _convert(node[key])
    for key in ("anyOf", "allOf", "oneOf"):
        for child in node.get(key) or []:
            _convert(child)


def crd_validator(crd: Mapping[str, Any], version: str | None = None) -> jsonschema.Validator:
    """A validator for objects of ``crd`` (its storage version unless ``version`` is given)."""
    versions = crd["spec"]["versions"]
    chosen = next(v for v in versions if (v["name"] == version if version else v["storage"]))
    schema = openapi_to_jsonschema(chosen["schema"]["openAPIV3Schema"])
    group = crd["spec"]["group"]
    schema.setdefault("properties", {})
    schema["properties"]["apiVersion"] = {"enum": [f"{group}/{chosen['name']}"]}
    schema["properties"]["kind"] = {"enum": [crd["spec"]["names"]["kind"]]}
    schema.setdefault("required", [])
    schema["required"] = sorted(set(schema["required"]) | {"apiVersion", "kind", "metadata"})
    return jsonschema.Draft4Validator(schema)

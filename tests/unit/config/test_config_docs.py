"""docs/configuration.md says what cistern.config declares: every key, its default and its
meaning, section by section, and no key that does not exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from cistern.config import NodeConfig
from cistern.configschema import Section

DOC = Path(__file__).resolve().parents[3] / "docs" / "configuration.md"


def _tables() -> dict[str, list[str]]:
    """The rows of each settings table, by heading ('store', ..., 'Top level')."""
    tables: dict[str, list[str]] = {}
    heading = None
    for line in DOC.read_text().splitlines():
        if line.startswith("### "):
            match = re.match(r"### (?:`(\w+)`|(Top level))", line)
            heading = (match.group(1) or match.group(2)) if match else None
        elif line.startswith("## "):
            heading = None
        elif heading and line.startswith("| `"):
            tables.setdefault(heading, []).append(line)
    return tables


def _expected() -> dict[str, list[str]]:
    tables: dict[str, list[str]] = {"Top level": []}
    for _, decl in NodeConfig.settings():
        if decl.section is not None:
            tables[decl.key] = [_row(d.key, d.shown_default, d.doc)
                                for _, d in decl.section.settings()]
        else:
            tables["Top level"].append(_row(decl.key, decl.shown_default, decl.doc))
    return tables


def _row(key: str, default: str, doc: str) -> str:
    return f"| `{key}` | {default} | {doc} |"


def test_every_settings_table_is_what_the_schema_declares() -> None:
    found, expected = _tables(), _expected()
    assert set(found) == set(expected)
    for heading, rows in expected.items():
        assert found[heading] == rows, (
            f"docs/configuration.md, table {heading!r} differs from cistern.config; "
            "expected:\n" + "\n".join(rows))


def _sections() -> list[type[Section]]:
    found: list[type[Section]] = [NodeConfig]
    for section in found:
        found.extend(d.section for _, d in section.settings() if d.section is not None)
    return found


@pytest.mark.parametrize("section", _sections(), ids=lambda s: s.__name__)
def test_the_default_the_docs_show_is_the_default(section: type[Section]) -> None:
    """A documented default in backticks, read as YAML, parses to the field's default; a key
    whose default is unset says so in words."""
    defaults = {f.name: f.default for f in section.__dataclass_fields__.values()}
    for name, decl in section.settings():
        if decl.section is not None or decl.shown_default == "(required)":
            continue
        default = defaults[name]
        if default is None:
            assert not decl.shown_default.startswith("`"), decl.key
            continue
        shown = re.findall(r"`([^`]+)`", decl.shown_default.split("(")[0])
        assert shown, f"{decl.key}: the docs show no default"
        raw = [yaml.safe_load(token) for token in shown]
        value = decl.parse(raw if isinstance(default, tuple) else raw[0], decl.key)
        assert value == default, decl.key

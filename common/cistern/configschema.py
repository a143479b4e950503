"""How a configuration key is declared once: its YAML name, parser, default, rendering and doc.

A section of the node configuration is a frozen dataclass whose fields are made with
``setting(...)`` (a value) or ``section(...)`` (a nested mapping). ``Section.from_dict`` and
``Section.to_dict`` walk those declarations, so a key is spelled in exactly one place; the
tables in docs/configuration.md are checked against the same declarations
(tests/unit/config/test_config_docs.py).

Parsers take the raw YAML value and ``where`` (the dotted key, for the error message) and
return the typed value or raise ``ConfigError``. They accept only what YAML says: a boolean is
a YAML boolean (``"false"`` is an error, not True), a number is never a bool, durations are
finite.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar, get_args

__all__ = [
    "ConfigError",
    "Parser",
    "Section",
    "Setting",
    "boolean",
    "check_bucket_name",
    "choice",
    "duration",
    "fraction",
    "optional",
    "parse_duration",
    "parse_size",
    "positive_int",
    "section",
    "setting",
    "size",
    "text",
]

T = TypeVar("T")
S = TypeVar("S", bound="Section")
Parser = Callable[[Any, str], Any]

_SIZE_UNITS = {
    "": 1,
    "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
    "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "": 1.0}
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]")
_IPV4 = re.compile(r"\d{1,3}(\.\d{1,3}){3}")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the problem."""


def check_bucket_name(name: Any, where: str) -> str:
    """S3's bucket naming rules, the one check both the node config and the CRD path use:
    3-63 characters of a-z, 0-9, '.' and '-', starting and ending with a letter or digit,
    no '..', not shaped like an IPv4 address, none of AWS's reserved prefixes/suffixes."""
    if (not isinstance(name, str) or not _BUCKET.fullmatch(name) or ".." in name
            or _IPV4.fullmatch(name) or name.startswith(("xn--", "sthree-"))
            or name.endswith(("-s3alias", "--ol-s3", ".mrap", "--x-s3"))):
        raise ConfigError(f"{where}: {name!r} is not a valid S3 bucket name")
    return name


def parse_size(value: Any, where: str = "size") -> int:
    """Parse a byte size: ``1048576``, ``"16Mi"``, ``"1G"``."""
    if isinstance(value, bool):
        raise ConfigError(f"{where}: expected a size, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"{where}: must not be negative, got {value}")
        return value
    if isinstance(value, float) and value.is_integer() and value >= 0:
        return int(value)
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", value)
        if match and match.group(2).lower() in _SIZE_UNITS:
            return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])
    raise ConfigError(f"{where}: expected a size like 1048576, '16Mi' or '1G', got {value!r}")


def parse_duration(value: Any, where: str = "duration") -> float:
    """Parse a duration in seconds: ``5``, ``0.5``, ``"500ms"``, ``"30s"``, ``"5m"``.

    Finite and not negative: ``nan``, ``inf`` (YAML ``.nan``, ``.inf``) and ``-1`` are errors.
    """
    if isinstance(value, bool):
        raise ConfigError(f"{where}: expected a duration, got {value!r}")
    seconds: float | None = None
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|)\s*", value)
        if match:
            seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    if seconds is None or math.isnan(seconds):
        raise ConfigError(f"{where}: expected a duration like 5, '500ms', '30s' or '5m', "
                          f"got {value!r}")
    if math.isinf(seconds):
        raise ConfigError(f"{where}: must be finite, got {value!r}")
    if seconds < 0:
        raise ConfigError(f"{where}: must not be negative, got {value!r}")
    return seconds


# Parser factories: each returns a ``(value, where) -> typed value`` function.

def duration(*, positive: bool = False) -> Callable[[Any, str], float]:
    """A finite duration in seconds; ``positive`` also refuses zero."""
    def parse(value: Any, where: str) -> float:
        seconds = parse_duration(value, where)
        if positive and seconds == 0:
            raise ConfigError(f"{where}: must be greater than zero, got {value!r}")
        return seconds
    return parse


def size(*, minimum: int = 0, maximum: int | None = None,
         bounds: str = "") -> Callable[[Any, str], int]:
    """A byte size in [minimum, maximum]; ``bounds`` says the range in the error."""
    def parse(value: Any, where: str) -> int:
        parsed = parse_size(value, where)
        if parsed < minimum or (maximum is not None and parsed > maximum):
            raise ConfigError(f"{where}: must be {bounds or f'at least {minimum}'}, "
                              f"got {value!r}")
        return parsed
    return parse


def rate(value: Any, where: str) -> float:
    """A positive rate (bytes or requests per second): a number or a size string."""
    if isinstance(value, str):
        parsed = float(parse_size(value, where))
    elif isinstance(value, bool) or not isinstance(value, int | float) \
            or not math.isfinite(value):
        raise ConfigError(f"{where}: expected a positive number, got {value!r}")
    else:
        parsed = float(value)
    if parsed <= 0:
        raise ConfigError(f"{where}: expected a positive number, got {value!r}")
    return parsed


def fraction(value: Any, where: str) -> float:
    """A share in (0, 1]."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
        raise ConfigError(f"{where}: expected a fraction in (0, 1], got {value!r}")
    return float(value)


def percent(value: Any, where: str) -> float:
    """A percentage in (0, 100]."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 100:
        raise ConfigError(f"{where}: expected 1-100, got {value!r}")
    return float(value)


def positive_int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where}: expected a positive integer, got {value!r}")
    return value


def boolean(value: Any, where: str) -> bool:
    """A YAML boolean only: ``"false"`` (a string) is an error rather than True."""
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    return value


def text(value: Any, where: str) -> str:
    """A non-empty string."""
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: expected a non-empty string, got {value!r}")
    return value


def choice(literal: Any) -> Callable[[Any, str], Any]:
    """One of the values of a ``Literal[...]`` type."""
    allowed: tuple[str, ...] = get_args(literal)

    def parse(value: Any, where: str) -> Any:
        if value not in allowed:
            raise ConfigError(f"{where}: expected one of {', '.join(allowed)}, got {value!r}")
        return value
    return parse


def name_glob(value: Any, where: str) -> str:
    """A glob on one file or directory name (no '/')."""
    if not isinstance(value, str) or not value or "/" in value:
        raise ConfigError(f"{where}: expected a file or directory name glob, got {value!r}")
    return value


def name_globs(value: Any, where: str) -> tuple[str, ...]:
    """A list of file-name globs."""
    if isinstance(value, str) or not isinstance(value, list | tuple):
        raise ConfigError(f"{where}: expected a list of glob patterns, got {value!r}")
    for item in value:
        if not isinstance(item, str) or not item or "/" in item:
            raise ConfigError(f"{where}: each pattern must be a non-empty file name glob, "
                              f"got {item!r}")
    return tuple(value)


def optional(parse: Callable[[Any, str], T]) -> Callable[[Any, str], T | None]:
    """``null`` (or an absent key) means unset; anything else goes through ``parse``."""
    def parse_optional(value: Any, where: str) -> T | None:
        return None if value is None else parse(value, where)
    return parse_optional


@dataclass(frozen=True)
class Setting:
    """One configuration key, declared in the field's metadata."""

    key: str
    """The YAML (camelCase) key, also the WriteCache CRD's name."""
    parse: Parser
    """Raw YAML value and dotted key -> the typed value, or ConfigError."""
    doc: str
    """What the key does (the 'meaning' column of docs/configuration.md)."""
    shown_default: str
    """The default as docs/configuration.md shows it (markdown)."""
    render: Callable[[Any], Any] | None = None
    """Typed value -> YAML value; None: as is (tuples become lists). None values are omitted."""
    example: str = ""
    """For a required key: an example shown in the 'required' error."""
    section: type[Section] | None = None
    """Set for a nested section (its fields are the keys)."""


def setting(key: str, default: Any, parse: Parser, doc: str, *, shown: str,
            render: Callable[[Any], Any] | None = None) -> Any:
    """A dataclass field for one key (typed as the field's annotation by the caller)."""
    return dataclasses.field(default=default, metadata={"setting": Setting(
        key=key, parse=parse, doc=doc, shown_default=shown, render=render)})


def required(key: str, parse: Parser, doc: str, *, example: str) -> Any:
    """A dataclass field for a key without a default."""
    return dataclasses.field(metadata={"setting": Setting(
        key=key, parse=parse, doc=doc, shown_default="(required)", example=example)})


def section(key: str, cls: type[Section], doc: str) -> Any:
    """A dataclass field holding a nested section (an absent or empty mapping: defaults)."""
    return dataclasses.field(default_factory=cls, metadata={"setting": Setting(
        key=key, parse=cls.parse, doc=doc, shown_default="", section=cls)})


def required_section(key: str, cls: type[Section], doc: str) -> Any:
    return dataclasses.field(metadata={"setting": Setting(
        key=key, parse=cls.parse, doc=doc, shown_default="(required)", section=cls)})


class Section:
    """Mixin for a frozen dataclass of ``setting``/``section`` fields."""

    WHERE: ClassVar[str] = ""
    """The section's dotted path in error messages ('' for the top level)."""

    @classmethod
    def settings(cls) -> list[tuple[str, Setting]]:
        """(attribute name, declaration) of every key, in declaration order."""
        return [(f.name, f.metadata["setting"]) for f in dataclasses.fields(cls)  # type: ignore[arg-type]
                if "setting" in f.metadata]

    @classmethod
    def parse(cls: type[S], value: Any, where: str) -> S:
        return cls.from_dict({} if value is None else value, where)

    @classmethod
    def from_dict(cls: type[S], data: Mapping[str, Any], where: str | None = None) -> S:
        where = cls.WHERE if where is None else where
        label = where or "node config"
        if not isinstance(data, Mapping):
            raise ConfigError(f"{label}: expected a mapping, got {type(data).__name__}")
        declared = cls.settings()
        unknown = sorted(set(data) - {s.key for _, s in declared})
        if unknown:
            raise ConfigError(f"{label}: unknown setting(s) {', '.join(map(str, unknown))}; "
                              f"known: {', '.join(sorted(s.key for _, s in declared))}")
        values: dict[str, Any] = {}
        for name, decl in declared:
            path = f"{where}.{decl.key}" if where else decl.key
            if decl.key in data:
                values[name] = decl.parse(data[decl.key], path)
            elif decl.section is not None:
                values[name] = decl.parse({}, path)
            elif decl.shown_default == "(required)":
                hint = f", e.g. {decl.example}" if decl.example else ""
                raise ConfigError(f"{path}: required{hint}")
        try:
            return cls(**values)
        except ConfigError as exc:
            # Cross-field checks (__post_init__) name their keys relative to the class's WHERE.
            if where != cls.WHERE:
                raise ConfigError(str(exc).replace(cls.WHERE, where, 1)) from exc
            raise

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, decl in self.settings():
            value = getattr(self, name)
            if value is None:
                continue
            if decl.section is not None:
                out[decl.key] = value.to_dict()
            elif decl.render is not None:
                out[decl.key] = decl.render(value)
            else:
                out[decl.key] = list(value) if isinstance(value, tuple) else value
        return out

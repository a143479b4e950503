"""Durability levels and the peer network of one WriteCache (issue 17, docs/dev/peers.md).

``durability`` says how durable an ``fsync`` is, for the whole cache and per path pattern;
``peers`` says how this node reaches the other nodes of its WriteCache. Keys are declared with
``cistern.configschema`` like every other section and documented in docs/configuration.md.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from cistern.configschema import (
    ConfigError,
    Section,
    choice,
    duration,
    positive_int,
    setting,
    text,
)

__all__ = [
    "DurabilityLevel",
    "DurabilityPolicy",
    "PathDurability",
    "PeersConfig",
    "Shortfall",
    "Transport",
]

DurabilityLevel = Literal["local", "peers", "s3"]
Shortfall = Literal["degrade", "fail"]
Transport = Literal["auto", "tcp", "rdma"]


@dataclass(frozen=True)
class PathDurability:
    """One ``durability.paths`` rule: keys matching ``pattern`` get ``level`` (and ``peers``)."""

    pattern: str
    level: DurabilityLevel
    peers: int | None = None


def _path_rules(value: Any, where: str) -> tuple[PathDurability, ...]:
    if not isinstance(value, list):
        raise ConfigError(f"{where}: expected a list of {{pattern, level, peers}}")
    rules = []
    for i, item in enumerate(value):
        at = f"{where}[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{at}: expected a mapping")
        unknown = set(item) - {"pattern", "level", "peers"}
        if unknown:
            raise ConfigError(f"{at}: unknown setting(s) {', '.join(sorted(unknown))}")
        rules.append(PathDurability(
            pattern=text(item.get("pattern"), f"{at}.pattern"),
            level=choice(DurabilityLevel)(item.get("level"), f"{at}.level"),
            peers=positive_int(item["peers"], f"{at}.peers") if "peers" in item else None))
    return tuple(rules)


def _render_rules(rules: tuple[PathDurability, ...] | None) -> list[dict[str, Any]] | None:
    if rules is None:
        return None
    return [{"pattern": r.pattern, "level": r.level,
             **({"peers": r.peers} if r.peers is not None else {})} for r in rules]


@dataclass(frozen=True)
class DurabilityPolicy(Section):
    """``durability``: what an ``fsync`` waits for."""

    WHERE: ClassVar[str] = "durability"

    level: DurabilityLevel = setting(
        "level", "local", choice(DurabilityLevel),
        "`local`: `fsync` returns once the file is journaled on this node. `peers`: also "
        "journaled (fsync'd) on `peers` other nodes of the WriteCache. `s3`: `fsync` returns "
        "once the object is in S3 (write-through for those files)", shown="`local`")
    peers: int = setting(
        "peers", 1, positive_int, "copies on other nodes that level `peers` waits for",
        shown="`1`")
    paths: tuple[PathDurability, ...] | None = setting(
        "paths", None, lambda v, w: None if v is None else _path_rules(v, w),
        "per path pattern (glob on the path below the mount, first match wins), e.g. "
        "`[{pattern: \"ckpt/*\", level: peers, peers: 2}]`", shown="unset",
        render=_render_rules)
    peer_timeout: float = setting(
        "peerTimeout", 2.0, duration(positive=True),
        "the bound on what an `fsync` waits for peer acknowledgements; a peer that misses it "
        "is skipped for `peers.suspectFor`", shown="`2s`")
    on_shortfall: Shortfall = setting(
        "onShortfall", "degrade", choice(Shortfall),
        "fewer than `peers` acknowledgements within `peerTimeout`: `degrade` (the fsync "
        "succeeds, durable locally; counted: `peers.copies_missing_total` in `/status`) or `fail` "
        "(the fsync fails with `EIO`; the data stays journaled locally)", shown="`degrade`")

    def for_key(self, key: str) -> tuple[DurabilityLevel, int]:
        for rule in self.paths or ():
            if fnmatch.fnmatchcase(key, rule.pattern):
                return rule.level, rule.peers or self.peers
        return self.level, self.peers

    @property
    def uses_peers(self) -> bool:
        return self.level == "peers" or any(r.level == "peers" for r in self.paths or ())


@dataclass(frozen=True)
class PeersConfig(Section):
    """``peers``: this node's place among the nodes of its WriteCache."""

    WHERE: ClassVar[str] = "peers"

    listen: str | None = setting(
        "listen", None, lambda v, w: None if v in (None, "") else text(v, w),
        "`host:port` of the peer server (copies, peer reads); unset: no peer network",
        shown="unset")
    node_name: str | None = setting(
        "nodeName", None, lambda v, w: None if v in (None, "") else text(v, w),
        "this node's name among the members (unset: the host name)", shown="unset")
    members_file: str | None = setting(
        "membersFile", None, lambda v, w: None if v in (None, "") else text(v, w),
        "JSON list of members `{\"members\": [{node, host, port}]}` the operator keeps "
        "current; re-read when it changes", shown="unset")
    token_file: str | None = setting(
        "tokenFile", None, lambda v, w: None if v in (None, "") else text(v, w),
        "file with the WriteCache's shared peer token (a Secret key; at least 16 bytes)",
        shown="unset")
    suspect_for: float = setting(
        "suspectFor", 10.0, duration(positive=True),
        "a peer that timed out is skipped this long before it is tried again", shown="`10s`")
    dead_after: float = setting(
        "deadAfter", 30.0, duration(positive=True),
        "a node that has not answered for this long is dead: the holders of its copies "
        "upload them (one upload per object, arbitrated by S3 conditional writes)",
        shown="`30s`")
    transport: Transport = setting(
        "transport", "auto", choice(Transport),
        "`tcp`, `rdma` (peer reads by one-sided RDMA READs through pyverbs, the `rdma` "
        "extra; falls back to TCP with the reason in the status) or `auto`",
        shown="`auto`")

"""The node config schema: parsing, defaults, clear errors, round trip."""

from __future__ import annotations

import fnmatch

import pytest
import yaml

from cistern.config import (
    ConfigError,
    NodeConfig,
    StoreConfig,
    parse_duration,
    parse_size,
)
from cistern.configschema import Section
from cistern.writecache import WriteCacheSpec


def test_sizes_and_durations() -> None:
    assert parse_size("16Mi") == 16 * 2**20
    assert parse_size("1G") == 10**9
    assert parse_size(4096) == 4096
    assert parse_duration("500ms") == 0.5
    assert parse_duration("5m") == 300
    assert parse_duration(2) == 2.0
    with pytest.raises(ConfigError, match="size"):
        parse_size("lots")
    with pytest.raises(ConfigError, match="negative"):
        parse_duration(-1)


def test_defaults_and_round_trip() -> None:
    config = NodeConfig.from_dict({"store": {"url": "s3://my-bucket/ckpt"}})
    assert config.store.bucket == "my-bucket" and config.store.prefix == "ckpt/"
    assert config.flush.mode == "writeBack"
    assert config.flush.is_commit_marker(".metadata")
    assert not config.flush.is_commit_marker("model.distcp")
    assert NodeConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("globs", [(), (".metadata",), ("*.metadata", "[ab]?x", "x*y"),
                                   ("[!a]*",), ("*",)])
def test_commit_markers_match_as_fnmatch_does(globs: tuple[str, ...]) -> None:
    # is_commit_marker compiles the globs into one pattern; it must agree with fnmatchcase.
    policy = NodeConfig.from_dict({"store": {"url": "s3://bucket"},
                                   "flush": {"commitMarkers": list(globs)}}).flush
    for name in ("a.metadata", ".metadata", "bzx", "cx", "xqy", "x\ny", "foo", "A.METADATA"):
        expected = any(fnmatch.fnmatchcase(name, glob) for glob in globs)
        assert policy.is_commit_marker(name) == expected, (name, globs)


@pytest.mark.parametrize(("data", "message"), [
    ({}, "store.url: required"),
    ({"store": {"url": "ftp://x"}}, "unsupported scheme"),
    ({"store": {"url": "s3://Bad_Bucket"}}, "not a valid S3 bucket"),
    ({"store": {"url": "file://relative"}}, "absolute path"),
    ({"store": {"url": "s3://ok-bucket"}, "flush": {"mode": "sometimes"}}, "flush.mode"),
    ({"store": {"url": "s3://ok-bucket"}, "flush": {"partSize": "1Mi"}}, "flush.partSize"),
    ({"store": {"url": "s3://ok-bucket"}, "cache": {"lowWatermark": 0.95}}, "lowWatermark"),
    ({"store": {"url": "s3://ok-bucket"}, "cache": {"colour": "red"}}, "unknown setting"),
    ({"store": {"url": "s3://ok-bucket"}, "drain": {"newWrites": "maybe"}}, "drain.newWrites"),
    ({"store": {"url": "s3://ok-bucket"}, "control": "nowhere"}, "HOST:PORT"),
    ({"store": {"url": "s3://ok-bucket"}, "fuseFrontend": "fast"}, "fuseFrontend"),
    ({"store": {"url": "s3://ok-bucket"}, "flush": {"streaming": "yes"}}, "flush.streaming"),
    ({"store": {"url": "s3://ok-bucket"}, "flush": {"streamExclude": "*.tmp"}},
     "flush.streamExclude"),
    ({"store": {"url": "s3://ok-bucket"}, "flush": {"maxConcurrentParts": 0}},
     "flush.maxConcurrentParts"),
])
def test_invalid_values_name_the_field(data: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        NodeConfig.from_dict(data)


_OK = {"store": {"url": "s3://ok-bucket"}}


@pytest.mark.parametrize(("data", "message"), [
    ({"store": {"url": "s3://ok-bucket", "pathStyle": "false"}}, "store.pathStyle: expected true"),
    ({**_OK, "allowOther": "false"}, "allowOther: expected true or false"),
    ({**_OK, "allowOther": 0}, "allowOther: expected true or false"),
    ({**_OK, "flush": {"uploadDelay": float("nan")}}, "flush.uploadDelay: expected a duration"),
    ({**_OK, "flush": {"uploadDelay": float("inf")}}, "flush.uploadDelay: must be finite"),
    ({**_OK, "cache": {"admissionTimeout": float("-inf")}}, "cache.admissionTimeout"),
    ({**_OK, "drain": {"timeout": 0}}, "drain.timeout: must be greater than zero"),
    ({**_OK, "cache": {"cacheTTL": "0s"}}, "cache.cacheTTL: must be greater than zero"),
    ({**_OK, "cache": {"capacityBytes": 0}}, "cache.capacityBytes: must be greater than zero"),
    ({**_OK, "flush": {"maxBytesPerSecond": float("inf")}}, "flush.maxBytesPerSecond"),
    ({**_OK, "flush": {"maxRequestsPerSecond": 0}}, "flush.maxRequestsPerSecond"),
    ({**_OK, "mount": 7}, "mount: expected a non-empty string"),
    ({**_OK, "cache": "big"}, "cache: expected a mapping"),
])
def test_values_yaml_would_coerce_are_refused(data: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        NodeConfig.from_dict(data)


def test_yaml_booleans_and_durations_parse() -> None:
    config = NodeConfig.from_dict(yaml.safe_load(
        "store: {url: 's3://ok-bucket', pathStyle: false}\nallowOther: no\n"
        "flush: {uploadDelay: 0}\ncache: {capacityBytes: 1Gi}\n"))
    assert config.store.path_style is False and config.allow_other is False
    assert config.flush.upload_delay == 0.0 and config.cache.capacity_bytes == 2**30
    with pytest.raises(ConfigError, match="flush.uploadDelay: must be finite"):
        NodeConfig.from_dict(yaml.safe_load("store: {url: 's3://b-1'}\n"
                                            "flush: {uploadDelay: .inf}\n"))


@pytest.mark.parametrize("name", [
    "ab", "a" * 64, "Bad", "-ab", "ab-", "a..b", "192.168.1.1", "xn--abc", "abc-s3alias",
    "a_b",
])
def test_one_bucket_rule_for_the_node_and_the_crd(name: str) -> None:
    with pytest.raises(ConfigError, match="store.url: .* is not a valid S3 bucket name"):
        NodeConfig.from_dict({"store": {"url": f"s3://{name}/p"}})
    with pytest.raises(ConfigError, match="spec.objectStore.bucket: .* not a valid S3 bucket"):
        WriteCacheSpec.from_dict({"objectStore": {"bucket": name}})


@pytest.mark.parametrize("name", ["abc", "a" * 63, "my.bucket-1", "1-2-3"])
def test_valid_bucket_names_pass_both_paths(name: str) -> None:
    assert NodeConfig.from_dict({"store": {"url": f"s3://{name}"}}).store.bucket == name
    assert WriteCacheSpec.from_dict({"objectStore": {"bucket": name}}).object_store.bucket == name


def test_the_crd_path_refuses_a_string_boolean() -> None:
    with pytest.raises(ConfigError, match="spec.objectStore.pathStyle"):
        WriteCacheSpec.from_dict({"objectStore": {"bucket": "abc", "pathStyle": "false"}})


def _every_section() -> list[type[Section]]:
    found: list[type[Section]] = [NodeConfig]
    for section in found:
        found.extend(decl.section for _, decl in section.settings() if decl.section)
    return found


@pytest.mark.parametrize("section", _every_section(), ids=lambda s: s.__name__)
def test_every_default_is_a_value_its_own_parser_accepts(section: type[Section]) -> None:
    """A key's default, written out as YAML would hold it, parses back to itself."""
    instance = section.from_dict(_OK["store"]) if section is StoreConfig else section.from_dict(
        _OK if section is NodeConfig else {})
    rendered = instance.to_dict()
    for name, decl in section.settings():
        value = getattr(instance, name)
        if value is None or decl.section is not None:
            continue
        assert decl.parse(rendered[decl.key], decl.key) == value, decl.key


def test_a_full_config_round_trips() -> None:
    data = {"store": {"url": "s3://ok-bucket/p", "endpointUrl": "http://127.0.0.1:9000",
                      "region": "eu-west-1", "pathStyle": True, "keepLastCheckpoints": 2},
            "mount": "/m", "control": "0.0.0.0:1", "controlTokenFile": "/t",
            "fuseFrontend": "pyfuse3", "allowOther": False,
            "cache": {"dir": "/c", "capacityBytes": "2Gi", "capacityPercent": 50,
                      "highWatermark": 0.7, "lowWatermark": 0.5, "admissionTimeout": "1m",
                      "keepLastCheckpoints": 3, "checkpointPattern": "ckpt-*", "cacheTTL": "1h"},
            "flush": {"mode": "writeThrough", "uploadDelay": "500ms", "maxConcurrentUploads": 2,
                      "partSize": "8Mi", "multipartThreshold": "64Mi", "maxBytesPerSecond": "1Gi",
                      "maxRequestsPerSecond": 100, "evacuationBytesPerSecond": 10**9,
                      "commitMarkers": ["DONE"], "streaming": False,
                      "streamExclude": ["*.staging"], "maxConcurrentParts": 3,
                      "streamTempSuffixes": [".staging"]},
            "drain": {"newWrites": "reject", "timeout": "2h"},
            "s3Endpoint": {"listen": "127.0.0.1:9470", "socket": "/s3.sock",
                           "credentialsDir": "/k", "bucket": "b"},
            "durability": {"level": "peers", "peers": 2, "peerTimeout": "1s",
                           "onShortfall": "fail",
                           "paths": [{"pattern": "tmp/*", "level": "local"},
                                     {"pattern": "ckpt/*", "level": "peers", "peers": 1}]},
            "peers": {"listen": "0.0.0.0:7070", "nodeName": "n1", "membersFile": "/p/m.json",
                      "tokenFile": "/p/token", "suspectFor": "5s", "deadAfter": "1m",
                      "transport": "tcp"}}
    config = NodeConfig.from_dict(data)
    assert NodeConfig.from_dict(config.to_dict()) == config
    assert config.cache.cache_ttl == 3600.0 and config.flush.part_size == 8 * 2**20
    assert set(config.to_dict()) == set(data)
    for key in ("store", "cache", "flush", "drain", "s3Endpoint"):
        assert set(config.to_dict()[key]) == set(data[key]), key


def test_streaming_keys() -> None:
    flush = NodeConfig.from_dict({"store": {"url": "s3://ok-bucket"}}).flush
    assert flush.streaming and flush.max_concurrent_parts == 8
    assert {"*.tmp", "*.partial"} <= set(flush.stream_exclude)
    custom = NodeConfig.from_dict({"store": {"url": "s3://ok-bucket"}, "flush": {
        "streaming": False, "streamExclude": ["*.staging"], "maxConcurrentParts": 3}}).flush
    assert (custom.streaming, custom.stream_exclude, custom.max_concurrent_parts) == (
        False, ("*.staging",), 3)
    assert NodeConfig.from_dict({"store": {"url": "s3://ok-bucket"},
                                 "flush": custom.to_dict()}).flush == custom

"""The node config schema: parsing, defaults, clear errors, round trip."""

from __future__ import annotations

import pytest

from cistern.config import ConfigError, NodeConfig, parse_duration, parse_size


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

"""cistern.writecache: WriteCache spec -> NodeConfig, the one shared rendering."""

from __future__ import annotations

import pytest

from cistern.config import ConfigError, NodeConfig
from cistern.writecache import WriteCacheSpec, render_node_config, storage_class_name


def test_full_spec_renders_every_setting() -> None:
    spec = WriteCacheSpec.from_dict({
        "objectStore": {"bucket": "ckpt-bucket", "prefix": "/runs/a/", "region": "eu-west-1",
                        "endpoint": "http://minio:9000", "pathStyle": True,
                        "credentialsSecretRef": {"name": "creds"}},
        "nodeSelector": {"gpu": "true"},
        "tolerations": [{"key": "gpu", "operator": "Exists"}],
        "cache": {"hostPath": "/mnt/nvme/", "capacityBytes": "2Ti", "highWatermark": 0.95,
                  "lowWatermark": 0.85, "admissionTimeout": "1m"},
        "flush": {"mode": "writeThrough", "uploadDelay": "500ms", "maxConcurrentUploads": 8,
                  "partSize": "64Mi", "maxBytesPerSecond": "1Gi", "maxRequestsPerSecond": 100,
                  "evacuationBytesPerSecond": "4Gi", "commitMarkers": ["DONE"]},
        "retention": {"keepLastCheckpoints": 2, "keepLastCheckpointsInStore": 10,
                      "checkpointPattern": "ckpt-*", "cacheTTL": "24h"},
        "drain": {"newWrites": "reject", "timeout": "30m"},
        "csi": {"storageClassName": "fast-ckpt", "reclaimPolicy": "Retain"},
    })
    assert spec.object_store.credentials_secret == "creds"
    assert spec.node_selector == {"gpu": "true"}
    assert storage_class_name("train", spec) == "fast-ckpt"
    config = render_node_config("train", spec, mount_root="/mnt/cistern/", cache_dir="/cache",
                                control="0.0.0.0:9464", control_token_file="/t/token")
    assert config.store.url == "s3://ckpt-bucket/runs/a"
    assert config.store.prefix == "runs/a/"
    assert (config.store.endpoint_url, config.store.region, config.store.path_style) == (
        "http://minio:9000", "eu-west-1", True)
    assert config.store.keep_last_checkpoints == 10
    assert config.mount == "/mnt/cistern/train"
    assert config.cache.dir == "/cache"
    assert config.cache.capacity_bytes == 2 * 2**40
    assert (config.cache.high_watermark, config.cache.low_watermark) == (0.95, 0.85)
    assert config.cache.admission_timeout == 60.0
    assert (config.cache.keep_last_checkpoints, config.cache.checkpoint_pattern,
            config.cache.cache_ttl) == (2, "ckpt-*", 86400.0)
    assert config.flush.mode == "writeThrough"
    assert config.flush.upload_delay == 0.5
    assert config.flush.part_size == 64 * 2**20
    assert config.flush.max_bytes_per_second == float(2**30)
    assert config.flush.commit_markers == ("DONE",)
    assert (config.drain.new_writes, config.drain.timeout) == ("reject", 1800.0)
    assert (config.control, config.control_token_file) == ("0.0.0.0:9464", "/t/token")
    # The daemon parses exactly what the operator writes.
    assert NodeConfig.from_dict(config.to_dict()) == config


def test_minimal_spec_uses_the_defaults() -> None:
    spec = WriteCacheSpec.from_dict({"objectStore": {"bucket": "abc"}})
    assert storage_class_name("ckpt", spec) == "cistern-ckpt"
    assert spec.csi.reclaim_policy == "Delete"
    config = render_node_config("ckpt", spec)
    assert config.store.url == "s3://abc"
    assert config.mount == "/var/lib/cistern/mounts/ckpt"
    assert config.cache.dir == "/var/lib/cistern/cache"
    assert config.flush == spec.flush and config.drain.new_writes == "hold"


@pytest.mark.parametrize(("spec", "message"), [
    ({}, "spec.objectStore: required"),
    ({"objectStore": {"bucket": "UPPER"}}, "spec.objectStore.bucket"),
    ({"objectStore": {"bucket": "abc", "prefix": "a/../b"}}, "spec.objectStore.prefix"),
    ({"objectStore": {"bucket": "abc", "endpoint": "ftp://x"}}, "spec.objectStore.endpoint"),
    ({"objectStore": {"bucket": "abc"}, "cache": {"hostPath": "../etc"}}, "spec.cache.hostPath"),
    ({"objectStore": {"bucket": "abc"}, "cache": {"lowWatermark": 0.9, "highWatermark": 0.8}},
     "lowWatermark"),
    ({"objectStore": {"bucket": "abc"}, "flush": {"partSize": "1Mi"}}, "spec.flush.partSize"),
    ({"objectStore": {"bucket": "abc"}, "flush": {"mode": "later"}}, "spec.flush.mode"),
    ({"objectStore": {"bucket": "abc"}, "drain": {"timeout": "forever"}}, "spec.drain.timeout"),
    ({"objectStore": {"bucket": "abc"}, "retention": {"keepLastCheckpoints": 0}},
     "spec.retention.keepLastCheckpoints"),
    ({"objectStore": {"bucket": "abc"}, "csi": {"reclaimPolicy": "Recycle"}},
     "spec.csi.reclaimPolicy"),
    ({"objectStore": {"bucket": "abc"}, "colour": "blue"}, "unknown field(s) colour"),
])
def test_bad_specs_name_the_field(spec: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")
                       .replace(")", r"\)")):
        WriteCacheSpec.from_dict(spec)


def test_writecache_name_must_be_a_dns_label() -> None:
    spec = WriteCacheSpec.from_dict({"objectStore": {"bucket": "abc"}})
    with pytest.raises(ConfigError, match="metadata.name"):
        render_node_config("Bad_Name", spec)

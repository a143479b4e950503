"""The ``s3Endpoint`` section of the node config: off by default, credentials required."""

from __future__ import annotations

import pytest

from cistern.config import ConfigError, NodeConfig


def test_off_by_default_and_round_trip() -> None:
    plain = NodeConfig.from_dict({"store": {"url": "s3://my-bucket"}})
    assert not plain.s3_endpoint.enabled
    assert not plain.to_dict().get("s3Endpoint")
    on = NodeConfig.from_dict({"store": {"url": "s3://my-bucket"}, "s3Endpoint": {
        "listen": "10.0.0.5:9470", "socket": "/run/s3.sock", "credentialsDir": "/etc/s3"}})
    assert on.s3_endpoint.enabled and on.s3_endpoint.listen == "10.0.0.5:9470"
    assert NodeConfig.from_dict(on.to_dict()) == on


@pytest.mark.parametrize(("section", "message"), [
    ({"listen": "127.0.0.1:9470"}, "credentialsDir: required"),
    ({"listen": "nowhere", "credentialsDir": "/x"}, "s3Endpoint.listen"),
    ({"port": 9470}, "unknown setting"),
])
def test_bad_sections_name_the_field(section: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        NodeConfig.from_dict({"store": {"url": "s3://my-bucket"}, "s3Endpoint": section})

"""The members file as a kubelet projects a ConfigMap key: ``members.json -> ..data/members.json``
and ``..data -> ..<timestamp>``, updated by swapping the ``..data`` symlink atomically. The node
stats the path (following the links), so the swap is seen as a change (issue 17)."""

from __future__ import annotations

import json
import os
import pathlib

from cistern.cachenode.peers.membership import Membership
from support.wait import wait_until


def _project(volume: pathlib.Path, stamp: str, members: list[dict[str, object]]) -> None:
    """What the kubelet's atomic writer does: a new timestamped directory, then ``..data``
    swapped to it with one rename, then the old directory removed."""
    new = volume / f"..{stamp}"
    new.mkdir()
    (new / "members.json").write_text(json.dumps({"members": members}))
    old = os.readlink(volume / "..data") if (volume / "..data").is_symlink() else None
    (volume / "..data_tmp").symlink_to(new.name)
    os.replace(volume / "..data_tmp", volume / "..data")
    if not (volume / "members.json").is_symlink():
        (volume / "members.json").symlink_to("..data/members.json")
    if old is not None:
        (volume / old / "members.json").unlink()
        (volume / old).rmdir()


def test_a_configmap_volume_update_is_followed(tmp_path: pathlib.Path) -> None:
    a = {"node": "a", "host": "10.0.0.5", "port": 9471}
    b = {"node": "b", "host": "10.0.0.6", "port": 9471}
    c = {"node": "c", "host": "10.0.0.7", "port": 9471}
    _project(tmp_path, "2026_11_29_10_00_00.1", [a, b])
    members = Membership(tmp_path / "members.json", "a")
    assert [m.node for m in members.others()] == ["b"]
    _project(tmp_path, "2026_11_29_10_01_00.2", [a, b, c])
    wait_until(lambda: [m.node for m in members.others()] == ["b", "c"], timeout=10,
               what="the swapped members file read")
    _project(tmp_path, "2026_11_29_10_02_00.3", [a, c])
    wait_until(lambda: [m.node for m in members.others()] == ["c"], timeout=10,
               what="a member that left")

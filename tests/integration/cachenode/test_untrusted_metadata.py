"""Issue 13: the node's FUSE mount is nosuid,nodev and modes from the bucket lose setuid/setgid.

Whoever can write the bucket controls object metadata (``mode``, ``uid``); a setuid-root file
planted there must not become one in a pod. Both FUSE front ends.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

from cistern.cachenode.objectmeta import mode_from_metadata


def test_mode_from_metadata_drops_set_id_bits() -> None:
    assert mode_from_metadata("4755") == 0o755
    assert mode_from_metadata("6750") == 0o750
    assert mode_from_metadata("1777") == 0o1777  # sticky is harmless
    assert mode_from_metadata("0o644") == 0o644
    assert mode_from_metadata("100755") == 0o755  # type bits never come from metadata


def test_mount_is_nosuid_nodev_and_planted_setuid_is_stripped(make_node: Any, bucket: str,
                                                              s3: Any) -> None:
    s3.put_object(Bucket=bucket, Key="tools/su", Body=b"#!/bin/sh\nid\n",
                  Metadata={"mode": "6755", "uid": "0", "gid": "0"})
    node = make_node(bucket)
    mountinfo = Path("/proc/self/mountinfo").read_text().splitlines()
    options = next(line.split()[5] for line in mountinfo if line.split()[4] == str(node.mount))
    assert {"nosuid", "nodev"} <= set(options.split(",")), options
    path = node.mount / "tools" / "su"
    assert path.read_bytes() == b"#!/bin/sh\nid\n"  # fetched: its metadata is applied now
    st = os.stat(path)
    assert st.st_mode & (stat.S_ISUID | stat.S_ISGID) == 0, oct(st.st_mode)
    assert st.st_mode & 0o777 == 0o755

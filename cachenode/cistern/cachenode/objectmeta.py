"""What an object's metadata may say about its file: untrusted input, sanitised here.

Anyone who can write the bucket can set an object's ``mode`` metadata, so a mode read from it
never carries setuid or setgid (a bucket writer must not be able to plant a setuid-root file
in a pod's volume; every mount is also ``nosuid``). Pure: no I/O.
"""

from __future__ import annotations

import stat

__all__ = ["SET_ID_BITS", "mode_from_metadata"]

SET_ID_BITS = stat.S_ISUID | stat.S_ISGID


def mode_from_metadata(raw: str) -> int:
    """The permission bits of an object's ``mode`` metadata (octal text) without setuid and
    setgid; ValueError if it is not octal."""
    return int(raw, 8) & 0o7777 & ~SET_ID_BITS

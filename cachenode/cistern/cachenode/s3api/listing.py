"""ListObjects(V2) over the namespace: keys in S3's order, prefixes, delimiters, pages.

Directories are walked depth first with each directory's children sorted by ``name`` for files
and ``name + "/"`` for directories, which yields keys in UTF-8 byte order (S3's order). With
the ``/`` delimiter a directory below the prefix is one common prefix and is not descended;
other delimiters are applied to the keys. Subtrees that lie wholly before the start marker
are skipped without being read.
"""

from __future__ import annotations

import base64
import binascii
import stat
from collections.abc import Iterator
from dataclasses import dataclass

from cistern.cachenode.core import Attr
from cistern.cachenode.s3api.errors import S3Error
from cistern.cachenode.s3api.keys import is_internal_name
from cistern.cachenode.s3api.objects import CacheObjects

__all__ = ["Page", "list_page", "decode_token", "encode_token"]

MAX_KEYS = 1000
MAX_PREFIX = 1024


@dataclass
class Page:
    contents: list[tuple[str, Attr]]
    prefixes: list[str]
    truncated: bool
    last: str | None
    """The last key or common prefix returned (the next page starts after it)."""


def encode_token(marker: str) -> str:
    return base64.urlsafe_b64encode(marker.encode()).decode()


def decode_token(token: str) -> str:
    try:
        return base64.urlsafe_b64decode(token.encode()).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise S3Error("InvalidArgument", "The continuation token provided is incorrect.") \
            from None


def _walk(objects: CacheObjects, ino: int, path: str, first: str, prefix: str,
          delimiter: str, marker: str) -> Iterator[tuple[str, Attr | None]]:
    """Yield (key, attr) for files and (common prefix, None) for pruned directories."""
    children = []
    for name, attr in objects.core.readdir(ino):
        if is_internal_name(name) or not name.startswith(first):
            continue
        is_dir = stat.S_ISDIR(attr.mode)
        children.append((name + "/" if is_dir else name, name, attr, is_dir))
    children.sort(key=lambda c: c[0])
    for _, name, attr, is_dir in children:
        full = path + name
        if not is_dir:
            if full.startswith(prefix) and full > marker:
                yield full, attr
            continue
        dpath = full + "/"
        if dpath <= marker and not marker.startswith(dpath):
            continue  # everything below sorts before the marker
        if delimiter == "/" and dpath.startswith(prefix) and len(dpath) > len(prefix):
            if dpath > marker and not marker.startswith(dpath):
                yield dpath, None
            continue
        yield from _walk(objects, attr.ino, dpath, "", prefix, delimiter, marker)


def list_page(objects: CacheObjects, *, prefix: str, delimiter: str, marker: str,
              max_keys: int) -> Page:
    if len(prefix) > MAX_PREFIX or len(delimiter) > MAX_PREFIX:
        raise S3Error("InvalidArgument", "The prefix or delimiter is too long.")
    max_keys = max(0, min(max_keys, MAX_KEYS))
    dir_path, _, first = prefix.rpartition("/")
    parts = dir_path.split("/") if dir_path else []
    if any(p in ("", ".", "..") for p in parts) or "\0" in prefix:
        return Page([], [], False, None)
    ino = objects.find_dir(parts)
    page = Page([], [], False, None)
    if ino is None:
        return page
    base = dir_path + "/" if dir_path else ""
    seen_prefix = None
    for key, attr in _walk(objects, ino, base, first, prefix, delimiter, marker):
        item_prefix = None
        if attr is None:
            item_prefix = key
        elif delimiter:
            rest = key[len(prefix):]
            cut = rest.find(delimiter)
            if cut >= 0:
                item_prefix = prefix + rest[:cut + len(delimiter)]
        if item_prefix is not None:
            if item_prefix == seen_prefix or (marker.startswith(item_prefix)):
                continue
            if len(page.contents) + len(page.prefixes) >= max_keys:
                page.truncated = True
                break
            seen_prefix = item_prefix
            page.prefixes.append(item_prefix)
            page.last = item_prefix
            continue
        if len(page.contents) + len(page.prefixes) >= max_keys:
            page.truncated = True
            break
        assert attr is not None
        page.contents.append((key, attr))
        page.last = key
    return page

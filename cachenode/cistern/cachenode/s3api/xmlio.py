"""S3's XML: request bodies parsed (bounded, no DTDs) and response documents built."""

from __future__ import annotations

import datetime as dt
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from xml.sax.saxutils import escape

from cistern.cachenode.s3api.errors import S3Error

__all__ = ["MAX_XML_BYTES", "document", "fields", "iso_time", "parse_complete", "parse_delete"]

MAX_XML_BYTES = 2 * 2**20
MAX_DELETE_KEYS = 1000
NS = "http://s3.amazonaws.com/doc/2006-03-01/"


def iso_time(seconds: float) -> str:
    when = dt.datetime.fromtimestamp(seconds, dt.UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"


def _element(name: str, value: object) -> str:
    if isinstance(value, bool):
        value = "true" if value else "false"
    return f"<{name}>{escape(str(value))}</{name}>"


def document(root: str, body: Iterable[str]) -> bytes:
    """``<root xmlns=…>`` + pre-rendered children (built with ``fields``)."""
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<{root} xmlns="{NS}">'
            + "".join(body) + f"</{root}>").encode()


def fields(**values: object) -> str:
    """Child elements in the order given; None values are left out."""
    return "".join(_element(k, v) for k, v in values.items() if v is not None)


def _parse(body: bytes) -> ET.Element:
    if len(body) > MAX_XML_BYTES:
        raise S3Error("MalformedXML", "The XML you provided is too large.")
    if b"<!DOCTYPE" in body or b"<!ENTITY" in body:
        raise S3Error("MalformedXML", "DTDs are not accepted.")
    try:
        return ET.fromstring(body)
    except ET.ParseError:
        raise S3Error("MalformedXML", "The XML you provided was not well-formed or did not "
                      "validate against our published schema.") from None


def _local(tag: str) -> str:
    return tag.rpartition("}")[2]


def _children(node: ET.Element, name: str) -> list[ET.Element]:
    return [c for c in node if _local(c.tag) == name]


def _text(node: ET.Element, name: str) -> str | None:
    found = _children(node, name)
    return (found[0].text or "") if found else None


def parse_complete(body: bytes) -> list[tuple[int, str]]:
    """CompleteMultipartUpload → [(part number, ETag)] in the order given."""
    root = _parse(body)
    if _local(root.tag) != "CompleteMultipartUpload":
        raise S3Error("MalformedXML", "Expected CompleteMultipartUpload.")
    parts = []
    for part in _children(root, "Part"):
        number, etag = _text(part, "PartNumber"), _text(part, "ETag")
        if number is None or etag is None or not number.strip().isdigit():
            raise S3Error("MalformedXML", "Each Part needs a PartNumber and an ETag.")
        parts.append((int(number), etag))
    return parts


def parse_delete(body: bytes) -> tuple[list[str], bool]:
    """DeleteObjects → (keys, quiet)."""
    root = _parse(body)
    if _local(root.tag) != "Delete":
        raise S3Error("MalformedXML", "Expected Delete.")
    keys = []
    for obj in _children(root, "Object"):
        key = _text(obj, "Key")
        if key is None:
            raise S3Error("MalformedXML", "Each Object needs a Key.")
        keys.append(key)
    if len(keys) > MAX_DELETE_KEYS:
        raise S3Error("MalformedXML", "At most 1000 keys can be deleted in one request.")
    quiet = (_text(root, "Quiet") or "").strip().lower() == "true"
    return keys, quiet

"""The bucket side of a power cut: freeze it with the device, judge it after recovery.

At a cut the node is stopped (SIGSTOP) so that it sends nothing more, like a node that lost
power; requests already on the wire may still land, as they may in reality. The bucket is
then copied server side to a bucket of its own for that cut (objects and open multipart
uploads), so each crash state is recovered against the store as it was at that instant,
independently of the others.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from support.powercut.workload import Mark

__all__ = ["CutFigures", "copy_bucket", "empty_bucket", "judge_bucket", "judge_local",
           "object_etags"]


@dataclass
class CutFigures:
    cuts: int = 0
    checked: int = 0
    lost: list[str] = field(default_factory=list)
    wrong_in_store: list[str] = field(default_factory=list)
    regressed: list[str] = field(default_factory=list)
    torn: list[str] = field(default_factory=list)
    open_uploads: list[str] = field(default_factory=list)
    #: conflicts a recovered node reported: there is no other writer, so each one is the node
    #: taking its own object for another writer's (its ETag lost with the power)
    conflicts: list[str] = field(default_factory=list)
    unsynced_new: int = 0

    def summary(self) -> str:
        return (f"cut points: {self.cuts}, fsync'd files checked: {self.checked}, "
                f"lost: {len(self.lost)}, wrong in S3: {len(self.wrong_in_store)}, "
                f"objects regressed: {len(self.regressed)}, torn: {len(self.torn)}, "
                f"multipart uploads left open: {len(self.open_uploads)}, "
                f"conflicts after recovery: {len(self.conflicts)}, "
                f"never-fsync'd new objects uploaded as found: {self.unsynced_new}")


def object_etags(s3: Any, bucket: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for item in page.get("Contents", []):
            out[item["Key"]] = item["ETag"].strip('"')
    return out


def copy_bucket(s3: Any, source: str, target: str) -> dict[str, str]:
    """Copy every object and recreate every open multipart upload; return the ETags the
    source had (multipart ETags stay recognisable that way)."""
    s3.create_bucket(Bucket=target)
    etags = object_etags(s3, source)
    for key in list(etags):
        try:
            s3.copy_object(Bucket=target, Key=key, CopySource={"Bucket": source, "Key": key})
        except s3.exceptions.NoSuchKey:
            # A DeleteObject that was on the wire when the node froze landed after the
            # listing: the key is gone at the cut (requests on the wire may land).
            del etags[key]
    for upload in s3.list_multipart_uploads(Bucket=source).get("Uploads", []):
        s3.create_multipart_upload(Bucket=target, Key=upload["Key"])
    return etags


def empty_bucket(s3: Any, bucket: str) -> None:
    for upload in s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []):
        s3.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
    keys = list(object_etags(s3, bucket))
    for i in range(0, len(keys), 1000):
        s3.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k}
                                                            for k in keys[i:i + 1000]]})
    s3.delete_bucket(Bucket=bucket)


def judge_local(mount: Path, mark: Mark, label: str, figures: CutFigures) -> None:
    """Every file whose fsync returned before the cut reads back intact."""
    for path, md5 in sorted(mark.required.items()):
        figures.checked += 1
        try:
            got = hashlib.md5((mount / path).read_bytes()).hexdigest()
        except OSError as exc:
            figures.lost.append(f"{label}: {path}: {exc}")
            continue
        if got != md5:
            figures.lost.append(f"{label}: {path} reads back other content than was fsync'd")


def judge_bucket(s3: Any, bucket: str, at_cut: dict[str, str], mark: Mark, final: Mark,
                 etag_to_md5: dict[str, str], label: str, figures: CutFigures) -> None:
    """After recovery and a flush: fsync'd files are in the store with their content, no
    object went back to an older or torn version, no multipart upload is left open.

    Versions are judged against the whole history (``final``): an operation in flight at
    the cut (a rename, a write) may be in the crash state although it returned later."""
    after = object_etags(s3, bucket)
    for path, md5 in sorted(mark.required.items()):
        if etag_to_md5.get(after.get(path, "")) != md5:
            figures.wrong_in_store.append(f"{label}: {path} is not in the store as fsync'd")
    for key, etag in sorted(after.items()):
        md5 = etag_to_md5.get(etag)
        history = final.history.get(key, [])
        if key not in at_cut:
            if md5 is None or md5 not in history:
                figures.unsynced_new += 1
            continue
        before = etag_to_md5.get(at_cut[key])
        if md5 is None:
            figures.torn.append(f"{label}: {key} now holds content the workload never wrote")
            continue
        if before is None or before not in history or md5 == before:
            continue
        first = history.index(before)
        if md5 not in history[first:] and not _moved_here(md5, key, at_cut, mark, final,
                                                          etag_to_md5):
            where = f"version {history.index(md5) + 1}" if md5 in history else \
                "a version of another path"
            figures.regressed.append(f"{label}: {key} went back from version {first + 1} to "
                                     f"{where} of {len(history)} written")
    for upload in s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []):
        figures.open_uploads.append(f"{label}: {upload['Key']} ({upload['UploadId']})")


def _moved_here(md5: str, key: str, at_cut: dict[str, str], mark: Mark, final: Mark,
                etag_to_md5: dict[str, str]) -> bool:
    """``md5`` is the store's version, at the cut, of a file renamed onto ``key`` before
    the cut (or a later version of it from before that rename).

    A rename is durable once any later WAL sync happened (a fsync of another file does it),
    while the renamed file's own unsynced rewrite is not: recovery then shows that file's
    object again (docs/dev/cachenode.md, Power loss) under its new name, i.e. copies the old
    key to ``key``. A file system would show that file's older content there too. Versions
    of the source path older than its object at the cut are still a regression; a source
    with no object at the cut can only be uploaded from its data file, any version of it."""
    for src, upto in mark.moved_in.get(key, []):
        versions = final.history.get(src, [])[:upto]
        low = 0
        if src in at_cut:
            held = etag_to_md5.get(at_cut[src])
            low = versions.index(held) if held in versions else len(versions)
        if md5 in versions[low:]:
            return True
    return False

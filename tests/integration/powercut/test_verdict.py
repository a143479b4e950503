"""The power-cut verdict on hand-made bucket states (no device needed).

A file renamed onto a path whose own rewrite was never fsync'd: when the rename is durable
and the rewrite is not, recovery shows that file's object (at its old key) under the new
name. That is a crash state, not a regression; an older version of the renamed file than
its object at the cut, or another path's content, still is one.
"""

from __future__ import annotations

import hashlib
from typing import Any

from support.powercut.verdict import CutFigures, judge_bucket, object_etags
from support.powercut.workload import Ledger

PART = 5 << 20


def _crash_state(s3: Any, bucket: str, after_f2: bytes) -> CutFigures:
    ledger = Ledger(PART)
    f5_old, f5_synced, f5_rewrite = b"w/f5|v1|old", b"w/f5|v2|synced", b"w/f5|v3|unsynced"
    f2_own, f7_own = b"w/f2|v4|own", b"w/f7|v5|own"
    for path, data in (("w/f5", f5_old), ("w/f5", f5_synced), ("w/f2", f2_own),
                       ("w/f7", f7_own)):
        begin = ledger.begin(path)
        ledger.assign(path, data, durable_from=begin)
        ledger.done()
    ledger.begin("w/f5")
    ledger.assign("w/f5", f5_rewrite)  # O_TRUNC rewrite, never fsync'd
    ledger.done()
    ledger.begin("w/f5", "w/f2")
    ledger.assign("w/f5", None)
    ledger.assign("w/f2", f5_rewrite)
    ledger.done()
    mark = ledger.mark()
    at_cut = {"w/f2": hashlib.md5(f2_own).hexdigest(),
              "w/f5": hashlib.md5(f5_synced).hexdigest(),
              "w/f7": hashlib.md5(f7_own).hexdigest()}
    s3.put_object(Bucket=bucket, Key="w/f2", Body=after_f2)
    s3.put_object(Bucket=bucket, Key="w/f7", Body=f7_own)
    assert set(object_etags(s3, bucket).values()) <= set(ledger.etags)
    figures = CutFigures()
    judge_bucket(s3, bucket, at_cut, mark, ledger.mark(), ledger.etags, "cut", figures)
    return figures


def test_renamed_file_showing_its_object_at_the_cut_is_no_regression(s3: Any,
                                                                     bucket: str) -> None:
    figures = _crash_state(s3, bucket, b"w/f5|v2|synced")
    assert figures.regressed == []


def test_renamed_file_older_than_its_object_at_the_cut_is_a_regression(s3: Any,
                                                                       bucket: str) -> None:
    figures = _crash_state(s3, bucket, b"w/f5|v1|old")
    assert len(figures.regressed) == 1, figures.regressed


def test_content_of_a_path_never_renamed_here_is_a_regression(s3: Any, bucket: str) -> None:
    figures = _crash_state(s3, bucket, b"w/f7|v5|own")
    assert len(figures.regressed) == 1, figures.regressed

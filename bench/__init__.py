"""Benchmarks: raw disk vs Cistern vs peers (JuiceFS, rclone, s3fs) over a local S3.

Run ``python -m bench`` (or ``make bench``); ``python -m bench --smoke`` for a tiny run.
See docs/benchmarks.md.
"""

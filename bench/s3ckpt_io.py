"""Child process of the S3-API benchmark: one ``S3Checkpoint`` save (s3torchconnector).

``python -m bench.s3ckpt_io --endpoint URL --uri s3://bucket/key --size-bytes N`` builds the
same deterministic state as ``bench.checkpoint_io`` (``--tensors`` float32 tensors), waits for
a line on stdin (so torch's import is not timed), saves it with ``torch.save`` into an
``S3Checkpoint`` writer and prints ``{"event": "saved", "started": <time.time()>,
"stall_s": ..., "size": <bytes>}``. Credentials and region come from the environment.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.s3ckpt_io")
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--uri", required=True)
    parser.add_argument("--size-bytes", type=int, required=True)
    parser.add_argument("--tensors", type=int, default=16)
    args = parser.parse_args(argv)

    import torch
    from s3torchconnector import S3Checkpoint, S3ClientConfig

    from bench.checkpoint_io import build_state

    state = build_state(args.size_bytes, args.tensors)
    checkpoint = S3Checkpoint(region="us-east-1", endpoint=args.endpoint,
                              s3client_config=S3ClientConfig(force_path_style=True))
    print(json.dumps({"event": "ready"}), flush=True)
    sys.stdin.readline()
    started = time.time()
    t0 = time.perf_counter()
    with checkpoint.writer(args.uri) as writer:
        torch.save(state, writer)
        size = writer.tell()
    stall = time.perf_counter() - t0
    print(json.dumps({"event": "saved", "started": started, "stall_s": stall, "size": size}),
          flush=True)


if __name__ == "__main__":
    main()

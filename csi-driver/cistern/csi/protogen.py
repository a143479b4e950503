"""Generate (or check) the Python bindings of ``proto/csi.proto``.

The bindings are committed in ``cistern/csi/proto/`` so that an installed wheel needs no
grpcio-tools. Regenerate them after editing the proto, and let CI fail when they are stale::

    python -m cistern.csi.protogen            # rewrite csi_pb2.py, csi_pb2.pyi, csi_pb2_grpc.py
    python -m cistern.csi.protogen --check    # exit 1 (and say which file) if they are stale

The proto is compiled with ``csi-driver/`` as the include root, so the generated modules import
each other as ``cistern.csi.proto.csi_pb2`` (no ``sys.path`` tricks).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

__all__ = ["GENERATED_FILES", "PROTO_DIR", "check", "generate"]

PROTO_DIR = Path(__file__).resolve().parent / "proto"
#: ``csi-driver/``: the include root, so the proto's import path is ``cistern/csi/proto/csi.proto``.
_INCLUDE_ROOT = PROTO_DIR.parents[2]
_PROTO = "cistern/csi/proto/csi.proto"
GENERATED_FILES = ("csi_pb2.py", "csi_pb2.pyi", "csi_pb2_grpc.py")


def generate(out_root: Path) -> list[Path]:
    """Compile the proto into ``out_root/cistern/csi/proto/``; return the generated files."""
    import grpc_tools
    from grpc_tools import protoc

    well_known = Path(grpc_tools.__file__).resolve().parent / "_proto"
    out_root.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"--proto_path={_INCLUDE_ROOT}",
        f"--proto_path={well_known}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        _PROTO,
    ]
    status = protoc.main(args)
    if status != 0:
        raise RuntimeError(f"protoc failed with status {status} on {_INCLUDE_ROOT / _PROTO}")
    out_dir = out_root / "cistern" / "csi" / "proto"
    return [out_dir / name for name in GENERATED_FILES]


def check() -> list[str]:
    """Regenerate into a temporary directory; return the committed files that differ."""
    with tempfile.TemporaryDirectory(prefix="cistern-protogen-") as tmp:
        stale = []
        for fresh in generate(Path(tmp)):
            committed = PROTO_DIR / fresh.name
            if not committed.exists() or committed.read_bytes() != fresh.read_bytes():
                stale.append(str(committed))
        return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cistern.csi.protogen", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true",
                        help="do not write; exit 1 if the committed bindings are stale")
    args = parser.parse_args(argv)
    if args.check:
        stale = check()
        if stale:
            print("stale CSI bindings (run `python -m cistern.csi.protogen`): "
                  + ", ".join(stale), file=sys.stderr)
            return 1
        print("CSI bindings are up to date")
        return 0
    with tempfile.TemporaryDirectory(prefix="cistern-protogen-") as tmp:
        for fresh in generate(Path(tmp)):
            shutil.copyfile(fresh, PROTO_DIR / fresh.name)
            print(f"wrote {PROTO_DIR / fresh.name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

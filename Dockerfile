# One image, three entry points:
#   cistern-operator  the WriteCache operator (Deployment, unprivileged)
#   cistern-csi       the CSI node plugin / controller (DaemonSet / Deployment)
#   cistern-node      the node cache daemon (started by the operator's DaemonSets, privileged)
#
#   docker build -t ghcr.io/cistern-dev/cistern:0.1.0 .

FROM python:3.11-slim-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential pkg-config libfuse3-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY common ./common
COPY cachenode ./cachenode
COPY operator ./operator
COPY csi-driver ./csi-driver
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim-bookworm
# fuse3: fusermount3 and /etc/fuse.conf for the daemon; util-linux: mount/umount for CSI.
RUN apt-get update \
 && apt-get install -y --no-install-recommends fuse3 libfuse3-3 util-linux ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && echo user_allow_other >> /etc/fuse.conf
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links /wheels cistern \
 && rm -rf /wheels \
 && useradd --system --uid 65532 --no-create-home --shell /usr/sbin/nologin cistern
LABEL org.opencontainers.image.title="cistern" \
      org.opencontainers.image.description="Write-back checkpoint cache: operator, CSI driver and node daemon" \
      org.opencontainers.image.licenses="Apache-2.0"
# The operator and CSI controller run as 65532 (set in the chart); the node daemon and the CSI
# node plugin run privileged as root for FUSE and bind mounts.
CMD ["cistern-operator", "--help"]

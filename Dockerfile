# storage-initializer: drop-in replacement for KServe's storage-initializer image.
#
#   docker build -t <registry>/storage-initializer:0.1.0 .
#
# Same contract as KServe's image: ENTRYPOINT /storage-initializer/scripts/initializer-entrypoint,
# called by KServe with `src_uri_0 dest_path_0 [src_uri_1 dest_path_1 ...]`.
# Runs as UID 1000 by default and as any other UID (Istio CNI's 1337, OpenShift's random UIDs):
# everything in the image is owned by root and readable by all, and nothing is written outside
# the mounted volumes and $TMPDIR, so a read-only root filesystem works.
# The only network access of the build is pip fetching the Python packages.

# Both stages must use the same base: the venv's python is a symlink into it.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------------------------
# builder: build our wheel, install it and its dependencies into a self-contained venv
# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1

# Optional dependency groups of the package (pyproject.toml) installed into the image, as a
# comma-separated list (--build-arg EXTRAS=kerberos,signing); none by default. Every scheme the
# stock initializer serves (git included: dulwich is a core dependency) needs none.
ARG EXTRAS=

WORKDIR /src
# .dockerignore lets through only pyproject.toml, README/LICENSE, the package and scripts/.
COPY . /src

RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip wheel --no-cache-dir --no-deps --wheel-dir /wheels /src \
    && set -- /wheels/*.whl \
    && /opt/venv/bin/pip install --no-cache-dir "$1${EXTRAS:+[${EXTRAS}]}" \
    && /opt/venv/bin/pip uninstall --yes pip \
    && /opt/venv/bin/python -m compileall -q -j 0 /opt/venv/lib \
    && mkdir -p /storage-initializer/scripts \
    && cp /src/scripts/initializer-entrypoint /storage-initializer/scripts/initializer-entrypoint \
    && chmod 0755 /storage-initializer/scripts/initializer-entrypoint \
    && chmod -R a+rX,go-w /opt/venv /storage-initializer

# ---------------------------------------------------------------------------------------------
# runtime: the slim base, the venv and the entrypoint script; nothing else
# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}

ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown

LABEL org.opencontainers.image.title="storage-initializer" \
      org.opencontainers.image.description="Drop-in replacement for KServe's storage-initializer: download a model once for many replicas sharing a volume" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${PYTHON_IMAGE}"

# HOME and the SDK caches point at /tmp: the image's home directories are not writable, and
# under an arbitrary UID there is no passwd entry at all. PYTHONUNBUFFERED makes sure the last
# log line (the one KServe copies into the InferenceService status) is written before exit.
ENV PATH=/opt/venv/bin:${PATH} \
    HOME=/tmp \
    TMPDIR=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    HF_HOME=/tmp/.cache/huggingface \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONFAULTHANDLER=1

# UID 1000 in group 0: files the tool creates on a volume are group-0 owned, which is what
# OpenShift-style arbitrary UIDs (always in group 0) expect.
RUN useradd --no-log-init --uid 1000 --gid 0 --no-create-home --home-dir /tmp \
        --shell /usr/sbin/nologin storage-initializer

COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /storage-initializer /storage-initializer

WORKDIR /tmp
USER 1000:0

ENTRYPOINT ["/storage-initializer/scripts/initializer-entrypoint"]

# fastmesh container image: `build` compiles the Cython data path into a wheel and installs it with
# its runtime dependencies into /opt/fastmesh; `standalone` (the default target) is the base image
# plus that folder, a tiny init and a non-root user: no compiler, no pip cache, no build deps.
#
#   docker build -t fastmesh .                      # or ./scripts/build-image (docker or buildah)
#   docker run --rm -p 8000:8000 fastmesh run --listen 0.0.0.0:8000
#   docker run --rm -p 8000:8000 -v $PWD/fastmesh.yaml:/etc/fastmesh/fastmesh.yaml:ro \
#       fastmesh run --config /etc/fastmesh/fastmesh.yaml
#
# BASE_IMAGE must be a Debian-based image with python3 >= 3.11 (the official python slim image, or
# the debootstrap-built base that scripts/build-image makes where registries cannot be reached).
# Package indexes reach the build stage only, never the final image: pip's config as the secret
# `pip-conf` (a pip.conf; its CA bundle as `pip-cert`) or PIP_* build arguments, apt sources as
# the secrets `apt-sources` (deb822) and `apt-list` (one-line format). All are optional.
# No `sidecar` target yet: `fastmesh sidecar` still takes --service and --app-port only as flags
# (issue 10 wants FASTMESH_SERVICE / FASTMESH_APP_PORT), and `fastmesh health` asks a gateway's
# admin API, not the sidecar's.

ARG BASE_IMAGE=docker.io/library/python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_TRUSTED_HOST
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# The compiler, and where python3 is Debian's own (the local base) its headers and venv module.
# tini: PID 1 of the final image (fastmesh reaps its own workers, not orphans adopted by PID 1).
RUN --mount=type=secret,id=apt-sources --mount=type=secret,id=apt-list \
    set -eu; \
    set --; \
    if [ -s /run/secrets/apt-sources ] || [ -s /run/secrets/apt-list ]; then \
        mkdir -p /tmp/apt-sources; \
        if [ -s /run/secrets/apt-sources ]; then cp /run/secrets/apt-sources /tmp/apt-sources/host.sources; fi; \
        if [ -s /run/secrets/apt-list ]; then cp /run/secrets/apt-list /tmp/apt-sources/host.list; fi; \
        set -- -o Dir::Etc::SourceParts=/tmp/apt-sources -o Dir::Etc::SourceList=/dev/null; \
    fi; \
    packages="gcc libc6-dev binutils tini"; \
    if dpkg -S "$(readlink -f "$(command -v python3)")" >/dev/null 2>&1; then \
        packages="$packages python3-dev python3-venv"; \
    fi; \
    apt-get "$@" update -qq; \
    apt-get "$@" install -y -qq --no-install-recommends $packages >/dev/null; \
    rm -rf /var/lib/apt/lists/* /tmp/apt-sources

WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY fastmesh ./fastmesh
# One venv to build with (pip, setuptools, Cython), one without pip to ship. The wheel carries
# the Cython sources and the generated C (11 MB) and the compiled modules their debug symbols:
# neither runs, both go. Bytecode stays (it is what keeps the start fast).
RUN --mount=type=secret,id=pip-conf --mount=type=secret,id=pip-cert \
    set -eu; \
    if [ -s /run/secrets/pip-conf ]; then export PIP_CONFIG_FILE=/run/secrets/pip-conf; fi; \
    python3 -m venv /opt/build; \
    /opt/build/bin/pip wheel --quiet --wheel-dir /wheels .; \
    python3 -m venv --without-pip /opt/fastmesh; \
    /opt/build/bin/pip --python /opt/fastmesh/bin/python install --quiet --no-index \
        --find-links /wheels fastmesh; \
    find /opt/fastmesh -name '*.so' -exec strip --strip-unneeded {} +; \
    find /opt/fastmesh/lib/python3*/site-packages/fastmesh \
        \( -name '*.c' -o -name '*.pyx' -o -name '*.pxd' -o -name '*.html' \) -delete; \
    /opt/fastmesh/bin/fastmesh --version


FROM ${BASE_IMAGE} AS standalone
ARG BASE_IMAGE
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG SOURCE=unknown
LABEL org.opencontainers.image.title="fastmesh" \
      org.opencontainers.image.description="API gateway with a Cython data path on uvloop" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"
COPY --from=build /opt/fastmesh /opt/fastmesh
COPY --from=build /usr/bin/tini-static /usr/local/bin/tini
RUN useradd --uid 10001 --user-group --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin fastmesh \
    && mkdir -p /etc/fastmesh
ENV PATH=/opt/fastmesh/bin:$PATH PYTHONUNBUFFERED=1
USER 10001:10001
WORKDIR /etc/fastmesh
EXPOSE 8000
# Asks the admin API on 127.0.0.1:8001 inside the container (keep it on loopback, or pass
# --admin / FASTMESH_ADMIN_TOKEN here when the config moves it).
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 CMD ["fastmesh", "health"]
# tini is PID 1: it forwards SIGTERM to fastmesh (which drains and exits 0) and reaps orphans;
# -s keeps it reaping where it is not PID 1 (docker --init, a shared process namespace).
ENTRYPOINT ["/usr/local/bin/tini", "-s", "--", "fastmesh"]
CMD ["run"]

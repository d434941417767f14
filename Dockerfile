# fastmesh container images: `build` compiles the Cython data path into a wheel and installs it with
# its runtime dependencies into /opt/fastmesh; `runtime` is the base image plus that folder, a tiny
# init and a non-root user (no compiler, no pip cache, no build deps); two targets on top of it:
#
# - `standalone` (the default: the last stage): the gateway, `fastmesh run`. It serves
#   $FASTMESH_CONFIG, else /etc/fastmesh/fastmesh.yaml when mounted, else the embedded default, on
#   FASTMESH_LISTEN=0.0.0.0:8000 (set here; it wins over the config's gateway.listen).
#
#     docker build -t fastmesh .                  # or ./scripts/build-image (docker or buildah)
#     docker run --rm -p 8000:8000 fastmesh
#     docker run --rm -p 8000:8000 -v $PWD/fastmesh.yaml:/etc/fastmesh/fastmesh.yaml:ro fastmesh
#
# - `sidecar`: `fastmesh sidecar` beside an app in its network namespace (a pod), settings from
#   the environment: FASTMESH_SERVICE (this instance's service), FASTMESH_APP_PORT (the app's port
#   on 127.0.0.1), FASTMESH_REGISTRY (redis://HOST:PORT/DB or file:PATH; default
#   redis://127.0.0.1:6379/0); flags after `sidecar` override them. Inbound 0.0.0.0:15006,
#   outbound 127.0.0.1:15001, admin API 127.0.0.1:15000 (its /ready is the HEALTHCHECK). It runs
#   as uid 10001 with the group `fastmesh-proxy` (gid 1337): the group that `mesh-init
#   --proxy-gid 1337` exempts from interception (docs/mesh.md: the uid may be the app's too).
#
#     docker build --target sidecar -t fastmesh-sidecar .
#     docker run -d --name app --network mesh fastmesh echo --listen 127.0.0.1:8080
#     docker run -d --network container:app -e FASTMESH_SERVICE=orders -e FASTMESH_APP_PORT=8080 \
#         -e FASTMESH_REGISTRY=redis://redis:6379/0 fastmesh-sidecar    # a Redis `redis` on `mesh`
#
#   The same image, as an init container, installs the interception rules (iptables is in it)
#   and exits: `fastmesh mesh-init --proxy-gid 1337`. That needs root and CAP_NET_ADMIN in the
#   pod's network namespace (`--user 0 --cap-add NET_ADMIN`; Kubernetes: runAsUser 0,
#   capabilities.add [NET_ADMIN]); where the node uses legacy iptables, add `--iptables
#   iptables-legacy --ip6tables ip6tables-legacy` and NET_RAW. The sidecar then runs with
#   `--intercept`.
#
# BASE_IMAGE must be a Debian-based image with python3 >= 3.11 (the official python slim image, or
# the debootstrap-built base that scripts/build-image makes where registries cannot be reached).
# Package indexes reach the build only, never an image: pip's config as the secret `pip-conf`
# (a pip.conf; its CA bundle as `pip-cert`) or PIP_* build arguments, apt sources as the secrets
# `apt-sources` (deb822) and `apt-list` (one-line format), used by scripts/image-apt (bind-mounted,
# not copied). All are optional.

ARG BASE_IMAGE=docker.io/library/python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_TRUSTED_HOST
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# The compiler, and where python3 is Debian's own (the local base) its headers and venv module.
# tini: PID 1 of the final images (fastmesh reaps its own workers, not orphans adopted by PID 1).
RUN --mount=type=bind,source=scripts/image-apt,target=/usr/local/sbin/image-apt \
    --mount=type=secret,id=apt-sources --mount=type=secret,id=apt-list \
    set -eu; \
    packages="gcc libc6-dev binutils tini"; \
    if dpkg -S "$(readlink -f "$(command -v python3)")" >/dev/null 2>&1; then \
        packages="$packages python3-dev python3-venv"; \
    fi; \
    image-apt $packages

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


# What both targets share: the runtime, the init, the users, the labels.
FROM ${BASE_IMAGE} AS runtime
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
# Debian's dynamically linked tini (28 kB; the static one is 708 kB): it needs only libc, and
# both stages are the same base.
COPY --from=build /usr/bin/tini /usr/local/bin/tini
# HTTPS upstreams verify against the system CA bundle by default: Debian's ca-certificates, which
# both bases have (installed here for a base without it).
RUN --mount=type=bind,source=scripts/image-apt,target=/usr/local/sbin/image-apt \
    --mount=type=secret,id=apt-sources --mount=type=secret,id=apt-list \
    set -eu; \
    if [ ! -s /etc/ssl/certs/ca-certificates.crt ]; then image-apt ca-certificates; fi; \
    useradd --uid 10001 --user-group --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin fastmesh; \
    groupadd --gid 1337 fastmesh-proxy; \
    mkdir -p /etc/fastmesh
ENV PATH=/opt/fastmesh/bin:$PATH PYTHONUNBUFFERED=1
WORKDIR /etc/fastmesh
# tini is PID 1: it forwards SIGTERM to fastmesh (which drains and exits 0) and reaps orphans;
# -s keeps it reaping where it is not PID 1 (docker --init, a shared process namespace).
ENTRYPOINT ["/usr/local/bin/tini", "-s", "--", "fastmesh"]


FROM runtime AS sidecar
LABEL org.opencontainers.image.title="fastmesh-sidecar" \
      org.opencontainers.image.description="fastmesh service-mesh sidecar (and its mesh-init)"
# iptables for `fastmesh mesh-init` in the init container (Debian's: iptables-nft by default,
# iptables-legacy beside it).
RUN --mount=type=bind,source=scripts/image-apt,target=/usr/local/sbin/image-apt \
    --mount=type=secret,id=apt-sources --mount=type=secret,id=apt-list \
    image-apt iptables
USER 10001:1337
EXPOSE 15006 15001
# Asks the sidecar's admin API (GET /ready on 127.0.0.1:15000 inside the container): ready when
# both listeners are up, the instance is registered and the registry view was loaded.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["fastmesh", "health", "--sidecar"]
CMD ["sidecar"]


FROM runtime AS standalone
ENV FASTMESH_LISTEN=0.0.0.0:8000
USER 10001:10001
EXPOSE 8000
# Asks the admin API on 127.0.0.1:8001 inside the container (keep it on loopback, or pass
# --admin / FASTMESH_ADMIN_TOKEN here when the config moves it).
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 CMD ["fastmesh", "health"]
CMD ["run"]

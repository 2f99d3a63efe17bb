# cognito-sidecar: a container beside a legacy service; see docs/deployment.md.
#   docker build -t cognito-sidecar .                                        the sidecar (the default target)
#   docker build --target emulator -t cognito-sidecar-emulator .             the same, plus the local emulator
# The build stage installs the locked dependencies (hashes checked) and the package into a virtual environment and
# strips it; each image is the base image plus that environment, nothing else. The bytecode is compiled with
# hashes, not timestamps, so that it is the same in every build. The production image leaves out the emulator
# (a stand-in Cognito that signs tokens for anyone): the compose dev stacks build the `emulator` target for it.

FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
# binutils for strip: the extension modules ship with debug symbols (uvloop's is 13.6 MB, 1.6 MB stripped).
# redis-py's Redis Stack command sets (search, JSON, time series, Bloom, vector sets; about 2 MiB with their
# bytecode) are dropped: they load only when called, and the token store calls none of them. So are the Google API
# protobufs that the OTLP exporter's package requires and never imports (about 3 MiB with their bytecode).
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends binutils \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/sidecar
# Dependencies first, in their own layer: a change to the source does not reinstall them.
COPY requirements.lock /tmp/requirements.lock
RUN /opt/sidecar/bin/pip install --require-hashes --no-deps -r /tmp/requirements.lock
COPY pyproject.toml README.md LICENSE /tmp/src/
COPY proxy /tmp/src/proxy
RUN /opt/sidecar/bin/pip install --no-deps /tmp/src \
 && /opt/sidecar/bin/pip uninstall -y -q pip setuptools \
 && find /opt/sidecar -name '*.so' -exec strip --strip-unneeded {} + \
 && find /opt/sidecar \( -name '*.pyx' -o -name '*.pxd' -o -name '*.pyi' -o -name '*.c' -o -name '*.h' \) -delete \
 && find /opt/sidecar -depth -type d -name __pycache__ -exec rm -rf {} + \
 && for module in search json timeseries bf vectorset; do \
      rm -r "/opt/sidecar/lib/python3.11/site-packages/redis/commands/$module"; done \
 && for package in api cloud gapic logging longrunning rpc type; do \
      rm -r "/opt/sidecar/lib/python3.11/site-packages/google/$package"; done \
 && python3 -m compileall -q -j 0 --invalidation-mode unchecked-hash /opt/sidecar/lib

# The production tree: the emulator's package removed (`demo` and `emulator` then say how to get it).
FROM build AS build-sidecar
RUN rm -r /opt/sidecar/lib/python3.11/site-packages/proxy/emulator

FROM python:3.11-slim AS runtime
# VERSION is proxy.__version__ (tests/unit/test_release.py checks that they agree); the release workflow passes
# the commit as REVISION and its time as CREATED, and builds with SOURCE_DATE_EPOCH set to that time, which makes
# the layers' timestamps that time (BuildKit's rewrite-timestamp; podman build --timestamp): the same inputs give
# the same image digest (scripts/container-check builds twice from nothing with podman and compares the layers).
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="cognito-sidecar" \
      org.opencontainers.image.description="Adds an Amazon Cognito token to every request a legacy service sends to API Gateway" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/cognito-sidecar/cognito-sidecar"
# /credentials: where the compose dev stack's emulator hands its made-up credentials to the sidecar (a volume
# mounted there starts as this directory: the sidecar's own, 0700).
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin sidecar \
 && install -d -m 0700 -o 10001 -g 10001 /credentials
ENV PATH=/opt/sidecar/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    # Inside a container the sidecar listens on all interfaces to be reachable from its neighbours; callers
    # must still come from SIDECAR_ALLOW_FROM (private ranges by default). See docs/security.md.
    SIDECAR_LISTEN=0.0.0.0:8080
USER 10001
EXPOSE 8080
# A bare interpreter per probe (~20 ms), following SIDECAR_LISTEN; ready means a valid token is held.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 CMD ["cognito-sidecar", "healthcheck"]
ENTRYPOINT ["cognito-sidecar"]
CMD ["serve"]

# The compose dev stacks' Cognito and API Gateway: `emulator --host 0.0.0.0` (also `demo`, and `serve`).
FROM runtime AS emulator
LABEL org.opencontainers.image.title="cognito-sidecar-emulator" \
      org.opencontainers.image.description="cognito-sidecar with its local Cognito and API Gateway emulator, for dev stacks only"
COPY --from=build /opt/sidecar /opt/sidecar

# The default target, last: the sidecar alone.
FROM runtime AS sidecar
COPY --from=build-sidecar /opt/sidecar /opt/sidecar

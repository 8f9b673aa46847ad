# syntax=docker/dockerfile:1
# fruitserve: TorchServe serving fruit.mar as a non-root user; only inference (8080) and metrics (8082)
# are published, management stays on the container's loopback. See SECURITY.md.
#
#   make mar                                  # model_store/fruit.mar must exist: it is copied into the image
#   docker build -t fruitserve .              # podman: add --format docker, or the OCI format drops HEALTHCHECK
#   make docker-test                          # the real build-and-run check (scripts/docker_test.sh)
#   docker run -d --name fruitserve -p 127.0.0.1:8080:8080 -p 127.0.0.1:8082:8082 fruitserve
#   TOKEN=$(docker exec fruitserve python -c 'import json; print(json.load(open("key_file.json"))["inference"]["key"])')
#   curl -H "Authorization: Bearer $TOKEN" -T apple.jpg http://127.0.0.1:8080/predictions/fruit
#
# Another archive: --build-arg MAR=<path in the build context> (.dockerignore admits only
# model_store/fruit.mar; add a `!` line for another one), or mount a model store over the baked one:
#   docker run ... -v "$PWD/model_store:/home/model-server/model-store:ro" fruitserve

# One pinned base for both stages, so the venv built below finds the same /usr/local/bin/python3.11.
# For byte-for-byte rebuilds pin it by digest as well (python:3.11-slim-bookworm@sha256:...).
# Without registry access, docker/base/make-base.sh makes a stand-in under this name (Debian's Python 3.11).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
# Build-time pip settings, unset unless given with --build-arg: a package index (a mirror), and a CA bundle
# for a TLS-intercepting proxy (mount it into the build: `podman build -v /etc/ssl/certs:/run/host-certs:ro
# --build-arg PIP_CERT=/run/host-certs/ca-certificates.crt`, as scripts/docker_test.sh does). They reach
# only this stage, never the runtime image.
ARG PIP_INDEX_URL
ARG PIP_CERT
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH="/opt/venv/bin:${PATH}"
# Only what serving needs: the handler inside fruit.mar imports torch, Pillow and NumPy, and ONNX Runtime for
# the int8 graph (`precision: auto` serves it on CPUs with VNNI); torchserve 0.12 imports PyYAML without
# declaring it. Versions as in pyproject.toml / constraints.txt (the tested venv).
# Note: PyPI's default torch wheel for Linux x86_64 is the CUDA build, which pulls several GB of nvidia-*
# wheels into the image although serving here is CPU-only. A CPU-only wheel index would shrink the image
# a lot; it is left out on purpose, so the build needs nothing but the default package index.
RUN pip install --no-cache-dir \
        torch==2.14.1 \
        torchvision==0.29.1 \
        torchserve==0.12.0 \
        pyyaml==6.0.3 \
        pillow==13.0.0 \
        numpy==2.4.6 \
        onnxruntime==1.32.0

FROM ${PYTHON_IMAGE} AS runtime
ARG MAR=model_store/fruit.mar
LABEL org.opencontainers.image.title="fruitserve" \
      org.opencontainers.image.description="TorchServe 0.12 serving the fruit classifier (fruit.mar)"

# TorchServe's frontend is Java 11+: Debian's headless JRE 17 (slim images lack the man directory its
# postinst links into, hence the mkdir). tini is PID 1 and signals the whole process group (-g), because
# the torchserve launcher does not pass SIGTERM on to Java and the workers.
# Debian package versions are not pinned: bookworm's security updates would break an exact pin.
# hadolint ignore=DL3008
RUN mkdir -p /usr/share/man/man1 \
    && apt-get update \
    && apt-get install -y --no-install-recommends openjdk-17-jre-headless tini \
    && rm -rf /var/lib/apt/lists/*

# A fixed, unprivileged UID/GID (not 1000, to stay clear of the first user on most hosts).
RUN groupadd --system --gid 10001 model-server \
    && useradd --system --uid 10001 --gid model-server --create-home --home-dir /home/model-server \
        --shell /usr/sbin/nologin model-server

COPY --from=builder /opt/venv /opt/venv
# Configuration, healthcheck and archive belong to root: the serving user can read but not change them,
# so a compromised worker cannot plant a new archive or loosen the configuration for the next start.
COPY docker/config.properties /etc/fruitserve/config.properties
COPY log4j2.xml /etc/fruitserve/log4j2.xml
COPY docker/healthcheck.py /usr/local/bin/fruit-healthcheck
COPY ${MAR} /home/model-server/model-store/fruit.mar

# TorchServe writes logs/ and key_file.json into its working directory, the serving user's home;
# the healthcheck reads the key from there whatever directory it is started in.
ENV PATH="/opt/venv/bin:${PATH}" \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    FRUIT_KEY_FILE=/home/model-server/key_file.json
WORKDIR /home/model-server
USER 10001:10001

# Inference and metrics only; management (8081) and gRPC (7070/7071) listen on loopback inside.
EXPOSE 8080 8082

# /ping needs the inference token: the script reads key_file.json from the working directory.
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
    CMD ["/opt/venv/bin/python", "/usr/local/bin/fruit-healthcheck"]

ENTRYPOINT ["/usr/bin/tini", "-g", "--"]
CMD ["torchserve", "--start", "--foreground", "--ncs", "--ts-config", "/etc/fruitserve/config.properties"]

# The shared GPU TensorFlow base: Debian bookworm (Python 3.11) with TensorFlow 2.21 and its
# CUDA libraries from pip wheels; the nodes need only the NVIDIA driver. Every package
# comes from the wheelhouse that `captioning image build` fills on the host, so the build
# needs no access to a Python package index (air-gapped clusters build it the same way).
ARG DEBIAN_IMAGE=debian:bookworm-slim
FROM ${DEBIAN_IMAGE}

ARG TF_REQUIREMENT="tensorflow[and-cuda]==2.21.0"
ENV DEBIAN_FRONTEND=noninteractive \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1

# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

COPY wheelhouse /tmp/wheelhouse
RUN pip install --no-index --find-links /tmp/wheelhouse -c /tmp/wheelhouse/constraints.txt "${TF_REQUIREMENT}" \
    && rm -rf /tmp/wheelhouse

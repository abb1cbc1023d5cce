# syntax=docker/dockerfile:1
# The otelflow agent image: docker build -t REGISTRY/otelflow:0.1.0 .
#
# Two stages on Debian 12 (the toolchain the committed BPF object is built with: clang 14.0.6,
# libbpf-dev 1.1.2). The build stage runs the same commands CI runs (tests/unit/test_dockerfile.py
# compares them with scripts/test and scripts/setup): `make -s -C bpf check` compiles flow.bpf.c
# and fails unless the result is byte-for-byte the committed otelflow/ebpf/flow.bpf.o that the
# package ships, then pip installs the package into a venv. The final stage gets that venv, Python
# and the libbpf runtime library: no compiler, no headers, no make.

FROM debian:12-slim AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends clang llvm libbpf-dev make python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY bpf/ bpf/
COPY otelflow/ otelflow/
RUN make -s -C bpf check
RUN python3 -m venv /opt/otelflow
RUN /opt/otelflow/bin/pip install -q .

FROM debian:12-slim
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="otelflow" \
      org.opencontainers.image.description="OpenTelemetry-native network-flow agent for Kubernetes (eBPF and conntrack)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="debian:12-slim"
# python3: the agent; libbpf1: libbpf.so.1, loaded through ctypes by the eBPF source;
# ca-certificates: TLS to the collector and the API server.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 libbpf1 ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/otelflow /opt/otelflow
# The root filesystem is read-only in the DaemonSet: bytecode was compiled by pip at install time.
ENV PATH=/opt/otelflow/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# root, with only the capabilities the DaemonSet adds (manifests/base/daemonset.yaml)
USER 0
ENTRYPOINT ["otelflow"]
CMD ["run"]

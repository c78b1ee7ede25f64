# syntax=docker/dockerfile:1
#
# onceflow's three services in one multi-stage build.
#
#   docker build -t onceflow .                        # all three binaries
#   docker build --target ingest -t onceflow-ingest . # one service per image
#
# The per-service targets (ingest, processor, notifier) run their binary with
# `serve` by default (`migrate` and `config` also exist). Every image listens
# on all interfaces (0.0.0.0), each service on its own port (ingest 8080,
# processor 8081, notifier 8082): the binaries' built-in default is
# 127.0.0.1, which nothing outside the container could reach. Set
# ONCEFLOW_LISTEN to choose another address.

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS builder
# rdkafka builds its bundled librdkafka with configure + make, against the
# system zlib and OpenSSL (TLS and SASL/SCRAM to Kafka). (Most of these are
# already in the rust image; listing them keeps the build honest if the base
# changes.)
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential python3 pkg-config zlib1g-dev libssl-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# The registry and target dir live in BuildKit cache mounts, so a rebuild
# after a source change does not recompile every dependency.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
        -p onceflow-ingest -p onceflow-processor -p onceflow-notifier -p onceflow-cli \
 && mkdir -p /out \
 && cp target/release/onceflow-ingest target/release/onceflow-processor target/release/onceflow-notifier \
       target/release/onceflow /out/

FROM debian:${DEBIAN_RELEASE}-slim AS runtime
# ca-certificates for https webhooks, OTLP and TLS to Kafka and PostgreSQL;
# libssl3 for librdkafka's TLS; curl for container health checks.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl libssl3 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 onceflow \
 && useradd --system --uid 10001 --gid onceflow --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin onceflow
COPY --from=builder /out/onceflow-ingest /out/onceflow-processor /out/onceflow-notifier /out/onceflow /usr/local/bin/
USER 10001:10001

FROM runtime AS ingest
ENV ONCEFLOW_LISTEN=0.0.0.0:8080
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/onceflow-ingest"]
CMD ["serve"]

FROM runtime AS processor
ENV ONCEFLOW_LISTEN=0.0.0.0:8081
EXPOSE 8081
ENTRYPOINT ["/usr/local/bin/onceflow-processor"]
CMD ["serve"]

FROM runtime AS notifier
ENV ONCEFLOW_LISTEN=0.0.0.0:8082
EXPOSE 8082
ENTRYPOINT ["/usr/local/bin/onceflow-notifier"]
CMD ["serve"]

# The synthetic probe (the onceflow CLI's `probe --every`): one onceflow.probe
# command through the whole stack every 60 s, its metrics on :9464.
FROM runtime AS probe
EXPOSE 9464
ENTRYPOINT ["/usr/local/bin/onceflow"]
CMD ["probe", "--every", "60", "--metrics-listen", "0.0.0.0:9464"]

# The default target: every binary, run by name, e.g.
#   docker run --rm onceflow onceflow-processor migrate
#   docker run -p 8081:8081 onceflow onceflow-processor serve
# Its entrypoint sets the listen address of whichever binary it runs (the
# same as the per-service images') unless ONCEFLOW_LISTEN is given.
FROM runtime AS all
COPY --chmod=755 deploy/docker/entrypoint.sh /usr/local/bin/onceflow-entrypoint
EXPOSE 8080 8081 8082
ENTRYPOINT ["/usr/local/bin/onceflow-entrypoint"]
CMD ["onceflow-ingest", "serve"]

# syntax=docker/dockerfile:1
# The CPU worker image: the `llmops-worker` binary of crate llmops-worker (no GPU code)
# on Debian slim, running as an unprivileged user. The operator uses it for pods with
# `gpus: 0` (--worker-image) and runs `llmops-worker agent` in them. Build from the
# repository root:
#   docker build -f images/worker.Dockerfile -t ghcr.io/llmops-dev/llmops-worker:0.1.0 .
# Builder and runtime are both Debian 13 (trixie). Release automation should pin both
# by digest.

FROM rust:1.95.0-slim-trixie AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p llmops-worker \
    && install -D -m 0755 target/release/llmops-worker /out/llmops-worker

FROM debian:13.3-slim
# The worker checks TLS peers (S3, https model sources) against the system's roots; the
# slim runtime has none, the builder does.
COPY --from=build /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY --from=build /out/llmops-worker /usr/local/bin/llmops-worker
# An unprivileged user with no login and no home; the worker writes only to the store
# mount and to its scratch directory (LLMOPS_SCRATCH, else /tmp).
RUN groupadd --system --gid 10001 llmops \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin llmops
USER 10001:10001
WORKDIR /tmp
# The OpenAI-compatible API of `serve` (and its /metrics, /healthz, /readyz).
EXPOSE 8000
ENTRYPOINT ["/usr/local/bin/llmops-worker"]
CMD ["agent"]

# syntax=docker/dockerfile:1
# The operator image: the `llmops-operator` binary of crate llmops-operator on
# distroless/cc (glibc, libgcc and CA certificates, no shell), running as its nonroot
# user. Build from the repository root:
#   docker build -f images/operator.Dockerfile -t ghcr.io/llmops-dev/llmops-operator:0.1.0 .
# The builder's Debian release matches the runtime's (trixie, Debian 13), so the binary
# links against the glibc it runs with. Release automation should pin both by digest.

FROM rust:1.95.0-slim-trixie AS build
WORKDIR /src
COPY . .
# The protocol is compiled by protox (no protoc); TLS is rustls with aws-lc-rs, built
# by the C compiler the slim image already has.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p llmops-operator \
    && install -D -m 0755 target/release/llmops-operator /out/llmops-operator

FROM gcr.io/distroless/cc-debian13:nonroot
COPY --from=build /out/llmops-operator /usr/local/bin/llmops-operator
# distroless's nonroot user, by number so that runAsNonRoot can verify it.
USER 65532:65532
# 9090: the worker gateway (gRPC); 8080: /metrics, /healthz, /readyz.
EXPOSE 9090 8080
ENTRYPOINT ["/usr/local/bin/llmops-operator"]
CMD ["run"]

# syntax=docker/dockerfile:1
# The GPU worker image: `llmops-worker` built with the crate's `cuda` feature
# (worker/Cargo.toml: candle-core/cuda and candle-nn/cuda), on the CUDA runtime image
# (cuBLAS and cuRAND included), running as an unprivileged user. The operator uses it
# for pods with `gpus: 1` (--worker-cuda-image). Build from the repository root:
#   docker build -f images/worker-cuda.Dockerfile \
#       --build-arg CUDA_COMPUTE_CAP=90 -t ghcr.io/llmops-dev/llmops-worker:0.1.0-cuda .
# CUDA_COMPUTE_CAP is the GPU generation the kernels are compiled for (80: A100,
# 86: A10/RTX 30xx, 89: L4/L40, 90: H100/H200); the build has no GPU to ask.
# Release automation should pin the images by digest.

# The Rust toolchain, copied into the CUDA image rather than downloaded there.
FROM rust:1.95.0-slim-trixie AS rust

FROM nvidia/cuda:12.9.1-devel-ubuntu24.04 AS build
ARG CUDA_COMPUTE_CAP=80
ENV RUSTUP_HOME=/usr/local/rustup \
    CARGO_HOME=/usr/local/cargo \
    PATH=/usr/local/cargo/bin:/usr/local/cuda/bin:$PATH \
    CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP}
COPY --from=rust /usr/local/rustup /usr/local/rustup
COPY --from=rust /usr/local/cargo /usr/local/cargo
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p llmops-worker --features cuda \
    && install -D -m 0755 target/release/llmops-worker /out/llmops-worker

FROM nvidia/cuda:12.9.1-runtime-ubuntu24.04
COPY --from=rust /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY --from=build /out/llmops-worker /usr/local/bin/llmops-worker
# Ubuntu's image already has uid 1000 (ubuntu); the worker gets a system uid of its own.
RUN groupadd --system --gid 10001 llmops \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin llmops
USER 10001:10001
WORKDIR /tmp
# Let the NVIDIA container runtime expose compute (not graphics) capabilities.
ENV NVIDIA_DRIVER_CAPABILITIES=compute,utility
EXPOSE 8000
ENTRYPOINT ["/usr/local/bin/llmops-worker"]
CMD ["agent"]

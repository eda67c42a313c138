# The static release-tasks binary in an image of its own, to copy into an app's image:
#
#   COPY --from=release-tasks /release-tasks /usr/local/bin/release-tasks
#
# Build: docker build -t release-tasks .
# The image is for the platform it is built on: an x86_64 machine builds x86_64-unknown-linux-musl, an
# arm64 one (Graviton, Ampere, Apple silicon) aarch64-unknown-linux-musl. For both at once:
#   docker buildx build --platform linux/amd64,linux/arm64 -t release-tasks .
# (each platform's build stage then runs on that platform, emulated where it must be).
# The build stage runs scripts/build-static, the same command CI runs, so CI checks what this holds.

FROM rust:1-bookworm AS build
# musl-tools: ring's C for x86_64 musl; on arm64, gcc (already in the image) compiles it.
RUN apt-get update \
 && apt-get install -y --no-install-recommends musl-tools file binutils \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN scripts/build-static --host \
 && cp "target/$(uname -m)-unknown-linux-musl/release/release-tasks" /release-tasks

FROM scratch
COPY --from=build /release-tasks /release-tasks
ENTRYPOINT ["/release-tasks"]

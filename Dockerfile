# The static release-tasks binary in an image of its own, to copy into an app's image:
#
#   COPY --from=release-tasks /release-tasks /usr/local/bin/release-tasks
#
# Build: docker build -t release-tasks .
# The build stage runs scripts/build-static, the same command CI runs, so CI checks what this holds.

FROM rust:1-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends musl-tools file binutils \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN scripts/build-static /release-tasks

FROM scratch
COPY --from=build /release-tasks /release-tasks
ENTRYPOINT ["/release-tasks"]

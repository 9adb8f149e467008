# syntax=docker/dockerfile:1
# One image with every tessera binary: tessera (CLI, `tessera local`), tessera-operator,
# tessera-csi (controller and node plugin) and tessera-apiserver. The Helm chart
# (charts/tessera) runs all of its components from it; e2e/run-kind.sh builds it and loads it
# into kind.
#
#   docker build -t tessera:dev .
#
# Needs BuildKit (the default builder of Docker 23 and later) for the cache mounts.

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=trixie

FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS builder
WORKDIR /src
# The whole workspace: every crate is a member, and the lockfile pins the dependency graph.
COPY . .
# Cache mounts keep the registry and the target directory between builds; the binaries are
# copied out of the cached target directory in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
        -p tessera -p tessera-operator -p tessera-csi -p tessera-apiserver \
 && mkdir -p /out \
 && cp target/release/tessera target/release/tessera-operator \
       target/release/tessera-csi target/release/tessera-apiserver /out/

FROM debian:${DEBIAN_RELEASE}-slim
# What the node plugin runs: mkfs.ext4/resize2fs (e2fsprogs), mkfs.xfs/xfs_growfs (xfsprogs),
# losetup/blkid/mount (util-linux, mount), fusermount3 (fuse3, for the fuse-loop frontend),
# modprobe (kmod, for nbd/loop modules). ca-certificates for TLS to the API server.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        ca-certificates e2fsprogs xfsprogs util-linux mount fuse3 kmod \
 && rm -rf /var/lib/apt/lists/*
COPY --from=builder /out/ /usr/local/bin/
# No USER: the node plugin must run as root (it mounts, formats and attaches devices); the
# chart runs the operator as UID 65532.
ENTRYPOINT []
CMD ["tessera", "--help"]

#!/usr/bin/env bash
# Runs every check and test of the workspace: formatting, clippy (warnings are errors), and all
# tests. This is the README's test command and what CI (.ci/run) runs.
#
# Tests that need root (loop devices, FUSE, mounts) print why they skip when not root.
set -euo pipefail
cd "$(dirname "$0")/.."

# Tools the tests drive. kubectl is preinstalled on our machines; the test that uses it says so
# and skips when it is absent.
# Real NBD peers (nbdinfo, nbdcopy, nbdfuse, fio's nbd engine, qemu-io) and FUSE for the data path.
need_pkgs=()
for tool in fio:fio nbdinfo:libnbd-bin nbdkit:nbdkit fusermount3:fuse3 qemu-io:qemu-utils; do
  command -v "${tool%%:*}" >/dev/null || need_pkgs+=("${tool##*:}")
done
if [ ${#need_pkgs[@]} -gt 0 ] && [ "$(id -u)" != 0 ]; then
  echo "note: not root, cannot install ${need_pkgs[*]}; the tests that need them print why they skip"
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  if [ ${#need_pkgs[@]} -gt 0 ]; then
    echo "== installing ${need_pkgs[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}"
  fi
fi

echo "== cargo fmt --check"
cargo fmt --all --check
echo "== cargo clippy --all-targets -- -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo test"
# Unit, integration and doc tests; benches and examples are compiled by clippy above but not run
# (they are measurement programs, not tests).
cargo test --workspace --locked

#!/usr/bin/env bash
# Runs every check and test of the workspace: formatting, clippy (warnings are errors), and all
# tests. This is the README's test command and what CI (.ci/run) runs.
#
# Tests that need root (loop devices, FUSE, mounts) print why they skip when not root.
set -euo pipefail
cd "$(dirname "$0")/.."

# Tools the tests drive. kubectl is preinstalled on our machines; the test that uses it says so
# and skips when it is absent.
need_pkgs=()
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  # (The data-path issue adds fuse3, nbdkit, libnbd-bin and fio here.)
  if [ ${#need_pkgs[@]} -gt 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}"
  fi
fi

echo "== cargo fmt --check"
cargo fmt --all --check
echo "== cargo clippy --all-targets -- -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo test"
cargo test --workspace --all-targets --locked
cargo test --workspace --doc --locked

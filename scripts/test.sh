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

# The Helm chart, rendered by Helm's own engine (the helm-python-sdk wheel embeds Helm's Go SDK),
# validated against the Kubernetes 1.33 schemas (kubernetes-validate ships them) and checked by
# scripts/check-chart.py. PyPI is reachable wherever this runs, so tools that cannot be installed
# are a failure, not a skip.
echo "== helm chart (lint, render, checks)"
chart_venv="${TESSERA_CHART_VENV:-${HOME:-/root}/.cache/tessera/chart-venv}"
chart_tools=('helm-python-sdk==0.2.2' 'kubernetes-validate==1.37.0' pyyaml)
if ! "$chart_venv/bin/python" -c 'import helm_python, kubernetes_validate, yaml' 2>/dev/null; then
  echo "installing ${chart_tools[*]} into $chart_venv"
  if ! python3 -m venv "$chart_venv" && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv
    python3 -m venv "$chart_venv" || true
  fi
  if ! "$chart_venv/bin/pip" install -q --disable-pip-version-check "${chart_tools[@]}"; then
    echo "FAIL: cannot install the chart check's tools (python3 -m venv, then pip install ${chart_tools[*]} into $chart_venv); the Helm chart is unchecked" >&2
    exit 1
  fi
fi
"$chart_venv/bin/python" scripts/check-chart.py

echo "== cargo clippy --all-targets -- -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo test"
# Unit, integration and doc tests; benches and examples are compiled by clippy above but not run
# (they are measurement programs, not tests).
cargo test --workspace --locked

#!/usr/bin/env bash
# Quickstart on the embedded default, no cluster and nothing to install but the Rust toolchain:
# builds `tessera` and runs `tessera local --demo` — the embedded API server, the operator, the
# CSI controller and three node agents as child processes with file-backed (sparse) areas under
# the data directory; then volumes provisioned through CSI, data written and verified through
# them, and a status table refreshed every 2 s. Ctrl-C stops everything; running it again
# resumes from the data directory. Extra arguments go to `tessera local` (e.g. --nodes 2).
#
#   TESSERA_DATA_DIR   data directory (default ./tessera-data)
#
# While it runs: kubectl --kubeconfig "$TESSERA_DATA_DIR/kubeconfig" get tessera -A
#                tessera get volumes --data-dir "$TESSERA_DATA_DIR"
set -euo pipefail
cd "$(dirname "$0")/.."
data="${TESSERA_DATA_DIR:-./tessera-data}"
cargo build --release -q -p tessera
exec "${CARGO_TARGET_DIR:-target}/release/tessera" local --demo --data-dir "$data" "$@"

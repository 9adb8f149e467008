#!/usr/bin/env bash
# Quickstart on the embedded default, no cluster: starts the embedded API server, installs the
# tessera CRDs and the examples with kubectl, shows them, and leaves the server running with its
# kubeconfig printed. (The full `tessera local --demo`, with operator and node agents, arrives with
# the CSI driver.)
set -euo pipefail
cd "$(dirname "$0")/.."
data="${TESSERA_DATA_DIR:-${TMPDIR:-/tmp}/tessera-quickstart}"
port="${TESSERA_API_PORT:-6443}"
mkdir -p "$data"
cargo build --release -q -p tessera-apiserver
bin="${CARGO_TARGET_DIR:-target}/release/tessera-apiserver"
"$bin" --data-dir "$data/api" --listen "127.0.0.1:$port" --kubeconfig "$data/kubeconfig" \
  >"$data/apiserver.log" 2>&1 &
pid=$!
echo "$pid" >"$data/apiserver.pid"
for _ in $(seq 1 100); do
  curl -sf "http://127.0.0.1:$port/readyz" >/dev/null 2>&1 && break
  kill -0 "$pid" 2>/dev/null || { cat "$data/apiserver.log"; exit 1; }
  sleep 0.1
done
k() { kubectl --kubeconfig "$data/kubeconfig" "$@"; }
k apply -f crds/
k apply -f examples/
echo
k get storagepools,storageareas,storagepriorityclasses
echo
k get storageclaims -A
echo
echo "A broken example is refused:"
k apply -f examples/invalid/03-claim.yaml || true
cat <<EOM

The API server keeps running (pid $pid, state in $data/api).
  kubectl --kubeconfig $data/kubeconfig get tessera -A
Stop it with: kill \$(cat $data/apiserver.pid)
EOM

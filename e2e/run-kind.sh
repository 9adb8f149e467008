#!/usr/bin/env bash
# Runs tessera on a kind cluster, for machines with Docker, kind, kubectl, helm and cargo:
#
#   1. builds the image from the repository's Dockerfile,
#   2. creates the cluster of e2e/kind-config.yaml (3 nodes; reused when it already exists) and
#      loads the image into its nodes,
#   3. installs charts/tessera with two file-backed areas per node and waits until every
#      component is ready, every area is Online and the driver is registered on every node,
#   4. runs the end-to-end scenarios (cargo test -p tessera-e2e) against the cluster: the
#      harness on this machine acts as csi-provisioner, csi-attacher and kubelet over the CSI
#      sockets, which e2e/kind-config.yaml mounts out of the nodes under /tmp/tessera-kind
#      (TESSERA_E2E_KUBECONFIG, TESSERA_E2E_CONTROLLER_SOCKET, TESSERA_E2E_NODES,
#      TESSERA_E2E_WORK_DIR, TESSERA_E2E_IO=nbd; see e2e/src/env.rs). The sockets belong to
#      root, so this step needs root (sudo -E e2e/run-kind.sh) unless SKIP_E2E=1,
#   5. runs a smoke test with a real PVC and pods: write a file on one node, read it back on
#      another node, grow the volume while mounted, delete everything.
#
# A cluster this run created is deleted at the end (and /tmp/tessera-kind emptied) unless
# KEEP_CLUSTER=1; a cluster that already existed is reused and left in place. On failure the
# components' logs are saved and their path printed. The mounts are fixed paths, so run one such
# cluster per machine at a time.
#
# Settings (environment):
#   TESSERA_KIND_CLUSTER  cluster name                    (default tessera-e2e)
#   TESSERA_IMAGE         image to build and load          (default tessera:e2e)
#   KIND_NODE_IMAGE       kind node image                  (default kindest/node:v1.33.1)
#   KEEP_CLUSTER          1 keeps the cluster afterwards   (default 0)
#   SKIP_BUILD            1 uses an already built TESSERA_IMAGE (default 0)
#   SKIP_E2E              1 skips the cargo e2e scenarios, only the smoke test runs (default 0)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CLUSTER="${TESSERA_KIND_CLUSTER:-tessera-e2e}"
IMAGE="${TESSERA_IMAGE:-tessera:e2e}"
NODE_IMAGE="${KIND_NODE_IMAGE:-kindest/node:v1.33.1}"
KEEP_CLUSTER="${KEEP_CLUSTER:-0}"
SKIP_BUILD="${SKIP_BUILD:-0}"
SKIP_E2E="${SKIP_E2E:-0}"
NAMESPACE=tessera-system
RELEASE=tessera
SMOKE_NS=tessera-smoke
AREAS_PER_NODE=2
# Fixed by the mounts of e2e/kind-config.yaml.
HOST_DIR=/tmp/tessera-kind
KIND_CONFIG="$ROOT/e2e/kind-config.yaml"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/tessera-kind.XXXXXX")"
KUBECONFIG="$WORK/kubeconfig"
export KUBECONFIG

log() { printf '\n== %s\n' "$*"; }
die() { printf 'run-kind: %s\n' "$*" >&2; exit 1; }

for tool in docker kind kubectl helm cargo; do
  command -v "$tool" >/dev/null || die "$tool is not installed (needed: docker, kind, kubectl, helm, cargo)"
done
docker info >/dev/null 2>&1 || die "the Docker daemon is not reachable (docker info failed)"
grep -q "$HOST_DIR/plugins" "$KIND_CONFIG" || die "$KIND_CONFIG does not mount $HOST_DIR"
if [ "$SKIP_E2E" != 1 ] && [ "$(id -u)" != 0 ]; then
  die "the e2e scenarios connect to root-owned CSI and NBD sockets mounted out of the kind nodes: run as root (sudo -E $0), or set SKIP_E2E=1 for the PVC smoke test only"
fi

# Empties $HOST_DIR (files there belong to root when the node plugins made them).
clean_host_dir() {
  [ -d "$HOST_DIR" ] || return 0
  rm -rf "$HOST_DIR" 2>/dev/null && return 0
  docker run --rm -v "$HOST_DIR:/clean" --entrypoint /bin/sh "$IMAGE" \
    -c 'rm -rf /clean/* /clean/.[!.]*' || true
  rmdir "$HOST_DIR" 2>/dev/null || true
}

created_cluster=0
finish() {
  local rc=$?
  if [ "$rc" -ne 0 ] && [ -s "$KUBECONFIG" ]; then
    mkdir -p "$WORK/logs"
    kubectl get pods -A -o wide >"$WORK/logs/pods.txt" 2>&1 || true
    kubectl get storageareas,storagepools,storageclaims,virtualvolumes -o yaml \
      >"$WORK/logs/tessera-objects.yaml" 2>&1 || true
    kubectl get pv,pvc,volumeattachments -A -o yaml >"$WORK/logs/volumes.yaml" 2>&1 || true
    kubectl get events -A --sort-by=.lastTimestamp >"$WORK/logs/events.txt" 2>&1 || true
    for pod in $(kubectl -n "$NAMESPACE" get pods -o name 2>/dev/null); do
      kubectl -n "$NAMESPACE" logs "$pod" --all-containers --prefix \
        >"$WORK/logs/${pod#pod/}.log" 2>&1 || true
    done
    printf 'run-kind: FAILED (exit %s); logs and objects in %s/logs\n' "$rc" "$WORK" >&2
  fi
  if [ "$KEEP_CLUSTER" = 1 ]; then
    printf 'run-kind: keeping cluster %s; kubeconfig: %s\n' "$CLUSTER" "$KUBECONFIG"
  elif [ "$created_cluster" = 1 ]; then
    kind delete cluster --name "$CLUSTER" || true
    clean_host_dir
  else
    printf 'run-kind: cluster %s existed before this run and is left as it was found\n' "$CLUSTER"
  fi
  exit "$rc"
}
trap finish EXIT

# Polls "$@" every 2 s until it succeeds, for at most $1 seconds.
wait_for() {
  local timeout="$1" what="$2"
  shift 2
  local deadline=$((SECONDS + timeout))
  until "$@"; do
    [ "$SECONDS" -lt "$deadline" ] || die "timed out after ${timeout}s waiting for $what"
    sleep 2
  done
}

if [ "$SKIP_BUILD" = 1 ]; then
  log "using the existing image $IMAGE"
else
  log "docker build $IMAGE"
  docker build -t "$IMAGE" "$ROOT"
fi

log "kind cluster $CLUSTER ($NODE_IMAGE)"
if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
  echo "reusing the existing cluster (and what it left in $HOST_DIR)"
else
  # A new cluster starts from empty node state: no area files or node.json of an older one.
  clean_host_dir
  mkdir -p "$HOST_DIR"/{state,work,controller} "$HOST_DIR"/plugins/{control-plane,worker,worker2}
  created_cluster=1
  kind create cluster --name "$CLUSTER" --image "$NODE_IMAGE" --config "$KIND_CONFIG" --wait 120s
fi
kind get kubeconfig --name "$CLUSTER" >"$KUBECONFIG"
mapfile -t NODES < <(kubectl get nodes -o jsonpath='{range .items[*]}{.metadata.name}{"\n"}{end}')
[ "${#NODES[@]}" -ge 2 ] || die "expected at least 2 nodes, found ${#NODES[@]}"
echo "nodes: ${NODES[*]}"

kind load docker-image "$IMAGE" --name "$CLUSTER"

log "helm install $RELEASE ($NAMESPACE)"
# Two sparse file-backed areas on every node, under the node's state directory. The paths match
# the mounts of e2e/kind-config.yaml; the controller runs on the control-plane node, whose
# socket directory is mounted out. The image was loaded, never pulled.
cat >"$WORK/values.yaml" <<VALUES
image:
  repository: "${IMAGE%:*}"
  tag: "${IMAGE##*:}"
  pullPolicy: Never
operator:
  replicas: 2
controller:
  socketHostPath: $HOST_DIR/controller
  nodeSelector:
    node-role.kubernetes.io/control-plane: ""
  tolerations:
    - key: node-role.kubernetes.io/control-plane
      operator: Exists
      effect: NoSchedule
node:
  stateDir: $HOST_DIR/state
  stateDirPerNode: true
  extraVolumes:
    - name: e2e-work
      hostPath:
        path: $HOST_DIR/work
        type: Directory
  extraVolumeMounts:
    - name: e2e-work
      mountPath: $HOST_DIR/work
      mountPropagation: Bidirectional
  areas:
    default:
      - name: area-0
        path: $HOST_DIR/state/__NODE_NAME__/areas/area-0.img
        sizeBytes: 4294967296
        mediaType: ssd
        poolName: default
      - name: area-1
        path: $HOST_DIR/state/__NODE_NAME__/areas/area-1.img
        sizeBytes: 4294967296
        mediaType: hdd
        poolName: default
VALUES
helm upgrade --install "$RELEASE" "$ROOT/charts/tessera" \
  --namespace "$NAMESPACE" --create-namespace \
  --values "$WORK/values.yaml" --wait --timeout 5m

log "waiting for the components"
kubectl -n "$NAMESPACE" rollout status deployment/tessera-operator --timeout=180s
kubectl -n "$NAMESPACE" rollout status deployment/tessera-csi-controller --timeout=180s
kubectl -n "$NAMESPACE" rollout status daemonset/tessera-csi-node --timeout=180s

expected_areas=$(( ${#NODES[@]} * AREAS_PER_NODE ))
online_areas() {
  local n
  n=$(kubectl get storageareas -o jsonpath='{range .items[*]}{.status.phase}{"\n"}{end}' \
    | grep -cx Online || true)
  echo "StorageAreas Online: $n of $expected_areas"
  [ "$n" -eq "$expected_areas" ]
}
wait_for 180 "every StorageArea to be Online" online_areas

registered_everywhere() {
  local node
  for node in "${NODES[@]}"; do
    kubectl get csinode "$node" -o jsonpath='{.spec.drivers[*].name}' 2>/dev/null \
      | grep -qw csi.tessera.io || return 1
  done
}
wait_for 120 "csi.tessera.io to be registered on every node (CSINode)" registered_everywhere
kubectl get storagepools,storageareas

if [ "$SKIP_E2E" = 1 ]; then
  log "skipping the e2e scenarios (SKIP_E2E=1)"
else
  log "e2e scenarios against the cluster"
  # <node>=<CSI socket on this machine>=<its state directory>, for every node.
  e2e_nodes=""
  for node in "${NODES[@]}"; do
    role="${node#"$CLUSTER"-}"
    [ -S "$HOST_DIR/plugins/$role/csi.sock" ] || die "no CSI socket of $node at $HOST_DIR/plugins/$role"
    e2e_nodes+="${e2e_nodes:+,}$node=$HOST_DIR/plugins/$role/csi.sock=$HOST_DIR/state/$node"
  done
  [ -S "$HOST_DIR/controller/csi.sock" ] || die "no CSI controller socket at $HOST_DIR/controller"
  (cd "$ROOT" \
    && TESSERA_E2E_KUBECONFIG="$KUBECONFIG" \
       TESSERA_E2E_CONTROLLER_SOCKET="$HOST_DIR/controller/csi.sock" \
       TESSERA_E2E_NODES="$e2e_nodes" \
       TESSERA_E2E_WORK_DIR="$HOST_DIR/work" \
       TESSERA_E2E_IO=nbd \
       cargo test --locked -p tessera-e2e -- --test-threads=1)
fi

log "smoke test: PVC and pods"
kubectl create namespace "$SMOKE_NS" --dry-run=client -o yaml | kubectl apply -f -
kubectl apply -n "$SMOKE_NS" -f - <<'PVC'
apiVersion: v1
kind: PersistentVolumeClaim
metadata:
  name: smoke
spec:
  accessModes: [ReadWriteOnce]
  storageClassName: tessera-high
  resources:
    requests:
      storage: 1Gi
PVC

# smoke_pod NAME NODE COMMAND: a pod on NODE with the PVC at /data.
smoke_pod() {
  kubectl apply -n "$SMOKE_NS" -f - <<POD
apiVersion: v1
kind: Pod
metadata:
  name: $1
spec:
  nodeSelector:
    kubernetes.io/hostname: $2
  tolerations:
    - operator: Exists
  terminationGracePeriodSeconds: 1
  containers:
    - name: app
      image: busybox:1.36
      command: ["sh", "-c", "$3"]
      volumeMounts:
        - name: data
          mountPath: /data
  volumes:
    - name: data
      persistentVolumeClaim:
        claimName: smoke
POD
  kubectl wait -n "$SMOKE_NS" --for=condition=Ready "pod/$1" --timeout=180s
}

first="${NODES[1]}"
second="${NODES[2]:-${NODES[0]}}"
token="tessera-smoke-$RANDOM$RANDOM"
smoke_pod writer "$first" "echo $token > /data/hello && sync && sleep 3600"
kubectl wait -n "$SMOKE_NS" --for=jsonpath='{.status.phase}'=Bound pvc/smoke --timeout=60s
pv=$(kubectl get -n "$SMOKE_NS" pvc smoke -o jsonpath='{.spec.volumeName}')
echo "PVC bound to $pv (volume $(kubectl get pv "$pv" -o jsonpath='{.spec.csi.volumeHandle}'))"
[ "$(kubectl exec -n "$SMOKE_NS" writer -- cat /data/hello)" = "$token" ] \
  || die "the writer pod on $first cannot read back what it wrote"
kubectl delete -n "$SMOKE_NS" pod writer --wait=true --timeout=120s

# The volume now moves to another node: its extents there are remote (single writer, seed 001).
smoke_pod reader "$second" "sleep 3600"
got=$(kubectl exec -n "$SMOKE_NS" reader -- cat /data/hello)
[ "$got" = "$token" ] || die "the reader pod on $second read '$got', expected '$token'"
echo "data written on $first read back on $second"

# Online expansion: the resizer grows the claim, the node grows the filesystem.
kubectl patch -n "$SMOKE_NS" pvc smoke --type merge \
  -p '{"spec":{"resources":{"requests":{"storage":"2Gi"}}}}'
kubectl wait -n "$SMOKE_NS" --for=jsonpath='{.status.capacity.storage}'=2Gi pvc/smoke --timeout=180s
size_kib=$(kubectl exec -n "$SMOKE_NS" reader -- df -k /data | awk 'NR==2 {print $2}')
[ "$size_kib" -gt $((1536 * 1024)) ] || die "the filesystem did not grow: ${size_kib} KiB"
echo "expanded to 2Gi (filesystem ${size_kib} KiB)"

kubectl delete -n "$SMOKE_NS" pod reader --wait=true --timeout=120s
kubectl delete -n "$SMOKE_NS" pvc smoke --wait=true --timeout=120s
pv_gone() { ! kubectl get pv "$pv" >/dev/null 2>&1; }
wait_for 120 "PV $pv to be deleted" pv_gone
claims_gone() { [ -z "$(kubectl get storageclaims -n "$SMOKE_NS" -o name 2>/dev/null)" ]; }
wait_for 120 "the StorageClaim of the PVC to be deleted" claims_gone
kubectl delete namespace "$SMOKE_NS" --wait=false

log "run-kind: passed"

#!/usr/bin/env bash
# Data-path benchmark: the same fio jobs (nbd engine, unix socket) against
#   - qemu-nbd -f raw -t -k <socket> <raw file>                 (the reference)
#   - the tessera engine, single-extent volume on that same raw file (one area)
#   - the tessera engine, the volume fragmented into 1 MiB extents over four area files
# runs alternated, REPS repetitions, medians; plus the resident memory of a process holding 100
# open 10 GiB volumes. Writes docs/benchmarks/datapath.md (a hand-written section after the
# "<!-- analysis -->" marker of the existing file is kept).
#
# Usage: scripts/bench-datapath.sh            (RUNTIME=5 REPS=3 SIZE_MIB=1024 by default)
#        ONLY=remote scripts/bench-datapath.sh
#            only the remote rows: the fragmented volume with local areas vs the same volume with
#            every area a RemoteArea to an in-process extent server on 127.0.0.1 (NBD over TCP),
#            1 MiB sequential read/write, iodepth 8; prints medians and remote/local, does not
#            touch $OUT (copy the numbers into its remote rows by hand).
# Needs: fio (with the nbd engine), qemu-nbd, python3, cargo.
set -euo pipefail

RUNTIME=${RUNTIME:-5}
RAMP=${RAMP:-1}
REPS=${REPS:-3}
SIZE_MIB=${SIZE_MIB:-1024}
EXTENT_MIB=1
AREAS=4
ONLY=${ONLY:-}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$ROOT/docs/benchmarks/datapath.md}

for tool in fio qemu-nbd python3 cargo; do
    command -v "$tool" >/dev/null || { echo "missing $tool" >&2; exit 1; }
done
fio --enghelp 2>/dev/null | grep -qw nbd || { echo "fio lacks the nbd engine" >&2; exit 1; }

# On disk (not tmpfs) so the area files behave like real areas; page cache is shared by all.
WORK=$(mktemp -d "${TMPDIR:-/var/tmp}/tessera-bench.XXXXXX")
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT

cd "$ROOT"
cargo build --release -q -p tessera-csi --example bench_datapath
BIN=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/release/examples/bench_datapath

SIZE=$((SIZE_MIB << 20))
AREA_MIB=$((SIZE_MIB / AREAS))
echo "preparing files in $WORK"
# Fully allocated (not sparse), so reads hit real blocks (or the page cache) on every target.
[ "$ONLY" = remote ] || dd if=/dev/zero of="$WORK/raw.img" bs=1M count="$SIZE_MIB" status=none
AREA_ARGS=()
for i in $(seq 0 $((AREAS - 1))); do
    dd if=/dev/zero of="$WORK/area$i.img" bs=1M count="$AREA_MIB" status=none
    AREA_ARGS+=(--area "$WORK/area$i.img")
done
sync

wait_socket() {
    for _ in $(seq 1 200); do [ -S "$1" ] && return 0; sleep 0.05; done
    echo "no socket $1" >&2; exit 1
}

if [ "$ONLY" = remote ]; then
    "$BIN" serve --socket "$WORK/frag.sock" --layout fragmented --extent $((EXTENT_MIB << 20)) \
        "${AREA_ARGS[@]}" --size "$SIZE" >"$WORK/frag.log" &
    PIDS+=($!)
    "$BIN" serve --socket "$WORK/remote.sock" --layout fragmented --extent $((EXTENT_MIB << 20)) \
        --remote "${AREA_ARGS[@]}" --size "$SIZE" >"$WORK/remote.log" &
    PIDS+=($!)
    for s in frag remote; do wait_socket "$WORK/$s.sock"; done
    cat "$WORK/frag.log" "$WORK/remote.log"
    mkdir -p "$WORK/json"
    TARGETS=(frag remote)
    for rep in $(seq 1 "$REPS"); do
        for job in read-1m write-1m; do
            for target in "${TARGETS[@]}"; do
                echo "rep $rep/$REPS $job $target"
                fio --name="$job" --ioengine=nbd --uri="nbd+unix:///?socket=$WORK/$target.sock" \
                    --rw="${job%-1m}" --bs=1m --iodepth=8 --size="$SIZE" --time_based \
                    --runtime="$RUNTIME" --ramp_time="$RAMP" --randrepeat=1 --norandommap \
                    --output-format=json --output="$WORK/json/$target.$job.$rep.json" >/dev/null
            done
        done
        TARGETS=("${TARGETS[@]:1}" "${TARGETS[0]}")
    done
    python3 - "$WORK/json" "$REPS" <<'EOF'
import json, os, statistics, sys
jdir, reps = sys.argv[1], int(sys.argv[2])
def metrics(path):
    d = json.load(open(path))["jobs"][0]
    side = d["read"] if d["read"]["io_bytes"] > 0 else d["write"]
    pct = side["clat_ns"].get("percentile", {})
    return dict(iops=side["iops"], mibs=side["bw_bytes"] / 2**20,
                p50=pct.get("50.000000", 0) / 1000, p99=pct.get("99.000000", 0) / 1000)
print("| workload | target | IOPS | MiB/s | p50 µs | p99 µs | spread | runs (MiB/s) | remote / local |")
print("|---|---|---:|---:|---:|---:|---:|---|---:|")
for job in ["read-1m", "write-1m"]:
    med = {}
    for t, label in [("frag", "local areas"), ("remote", "remote areas")]:
        runs = [metrics(os.path.join(jdir, f"{t}.{job}.{r}.json")) for r in range(1, reps + 1)]
        m = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        spread = (max(r["iops"] for r in runs) - min(r["iops"] for r in runs)) / max(1e-9, m["iops"])
        med[t] = m
        ratio = f"{m['iops'] / med['frag']['iops']:.2f}×" if t == "remote" else ""
        each = ", ".join(f"{r['mibs']:,.0f}" for r in runs)
        print(f"| {job} | {label} | {m['iops']:,.0f} | {m['mibs']:,.1f} | {m['p50']:,.0f} | "
              f"{m['p99']:,.0f} | {spread:.0%} | {each} | {ratio} |")
EOF
    exit 0
fi

qemu-nbd -f raw -t -k "$WORK/qemu.sock" "$WORK/raw.img" &
PIDS+=($!)
"$BIN" serve --socket "$WORK/single.sock" --layout single --area "$WORK/raw.img" --size "$SIZE" >"$WORK/single.log" &
PIDS+=($!)
"$BIN" serve --socket "$WORK/frag.sock" --layout fragmented --extent $((EXTENT_MIB << 20)) \
    "${AREA_ARGS[@]}" --size "$SIZE" >"$WORK/frag.log" &
PIDS+=($!)
for s in qemu single frag; do wait_socket "$WORK/$s.sock"; done
cat "$WORK/single.log" "$WORK/frag.log"

declare -A JOBS=(
    [randread-4k]="--rw=randread --bs=4k --iodepth=32"
    [randwrite-4k]="--rw=randwrite --bs=4k --iodepth=32"
    [read-1m]="--rw=read --bs=1m --iodepth=8"
    [write-1m]="--rw=write --bs=1m --iodepth=8"
)
ORDER=(randread-4k randwrite-4k read-1m write-1m)
TARGETS=(qemu single frag)
mkdir -p "$WORK/json"
for rep in $(seq 1 "$REPS"); do
    for job in "${ORDER[@]}"; do
        for target in "${TARGETS[@]}"; do
            echo "rep $rep/$REPS $job $target"
            # shellcheck disable=SC2086  # JOBS values are word lists on purpose
            fio --name="$job" --ioengine=nbd --uri="nbd+unix:///?socket=$WORK/$target.sock" \
                ${JOBS[$job]} --size="$SIZE" --time_based --runtime="$RUNTIME" \
                --ramp_time="$RAMP" --randrepeat=1 --norandommap \
                --output-format=json --output="$WORK/json/$target.$job.$rep.json" >/dev/null
        done
        # Alternate the order between repetitions so no target always runs first.
    done
    TARGETS=("${TARGETS[@]:1}" "${TARGETS[0]}")
done

echo "measuring RSS of 100 open 10 GiB volumes"
mkdir -p "$WORK/rss"
RSS_URING=$("$BIN" rss --dir "$WORK/rss" --volumes 100 --size $((10 << 30)) --driver auto)
rm -rf "$WORK/rss"; mkdir -p "$WORK/rss"
RSS_POOL=$("$BIN" rss --dir "$WORK/rss" --volumes 100 --size $((10 << 30)) --driver pool)

MACHINE="$(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), $(free -g | awk '/Mem:/{print $2}') GiB RAM, kernel $(uname -r), $(df -T "$WORK" | awk 'NR==2{print $2}') under the files; shared with other work (builds, tests) while measuring"
VERSIONS="$(fio --version), $(qemu-nbd --version | head -1)"

python3 - "$WORK/json" "$OUT" "$REPS" "$RUNTIME" "$SIZE_MIB" "$MACHINE" "$VERSIONS" "$RSS_URING" "$RSS_POOL" <<'EOF'
import json, os, statistics, sys, datetime
jdir, out, reps, runtime, size_mib, machine, versions, rss_uring, rss_pool = sys.argv[1:]
jobs = ["randread-4k", "randwrite-4k", "read-1m", "write-1m"]
targets = {"qemu": "qemu-nbd (raw file)", "single": "tessera, single extent",
           "frag": "tessera, 1,024 extents / 4 areas"}
def metrics(path):
    d = json.load(open(path))["jobs"][0]
    side = d["read"] if d["read"]["io_bytes"] > 0 else d["write"]
    pct = side["clat_ns"].get("percentile", {})
    return dict(iops=side["iops"], mibs=side["bw_bytes"] / 2**20,
                p50=pct.get("50.000000", 0) / 1000, p99=pct.get("99.000000", 0) / 1000)
res = {}
for job in jobs:
    for t in targets:
        runs = [metrics(os.path.join(jdir, f"{t}.{job}.{r}.json")) for r in range(1, int(reps) + 1)]
        res[(job, t)] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        res[(job, t)]["spread"] = (max(r["iops"] for r in runs) - min(r["iops"] for r in runs)) / max(1e-9, res[(job, t)]["iops"])
lines = []
w = lines.append
w("# Data-path benchmark: engine NBD frontend vs qemu-nbd")
w("")
w(f"Generated by `scripts/bench-datapath.sh` on {datetime.date.today()}. Do not edit above the analysis marker.")
w("")
w(f"- Machine: {machine}.")
w(f"- Tools: {versions}.")
w(f"- Each fio run: `--ioengine=nbd --uri=nbd+unix:///?socket=…`, one job, {runtime} s after 1 s ramp, "
  f"{size_mib} MiB volume, `--norandommap --randrepeat=1`; {reps} repetitions, targets alternated, medians shown "
  "(spread = (max−min)/median of IOPS).")
w("- qemu-nbd: `qemu-nbd -f raw -t -k <sock> raw.img` (default cache=writeback, page cache). "
  "tessera: `bench_datapath serve` (release build), the engine's local backend with `--direct off` "
  "(page cache, like qemu-nbd) and the default I/O driver (io_uring), the NBD server of `tessera-nbd`. "
  "Single extent: one 1 GiB extent on the same raw file. Fragmented: 1 MiB extents, each on one of "
  "four 256 MiB area files in a shuffled order (no two neighbours contiguous).")
w("")
w("| workload | target | IOPS | MiB/s | p50 µs | p99 µs | spread | vs qemu-nbd | vs single |")
w("|---|---|---:|---:|---:|---:|---:|---:|---:|")
verdicts = []
for job in jobs:
    q = res[(job, "qemu")]; s = res[(job, "single")]
    for t, label in targets.items():
        m = res[(job, t)]
        vq = m["iops"] / q["iops"] if q["iops"] else 0
        vs = m["iops"] / s["iops"] if s["iops"] else 0
        w(f"| {job} | {label} | {m['iops']:,.0f} | {m['mibs']:,.1f} | {m['p50']:,.0f} | {m['p99']:,.0f} | "
          f"{m['spread']:.0%} | {vq:.2f}× | {'' if t == 'qemu' else f'{vs:.2f}×'} |")
    f = res[(job, "frag")]
    verdicts.append((job, s["iops"] / q["iops"], f["iops"] / s["iops"]))
w("| any | tessera, remote volume (extent server over NBD/TCP) | not measured yet | | | | | | |")
w("")
w("Targets: single-extent ≥ 1.00× qemu-nbd (IOPS and throughput: MiB/s is IOPS × block size, so the "
  "ratio is the same); fragmented ≥ 0.95× single-extent.")
w("")
w("| workload | single / qemu-nbd | met | fragmented / single | met |")
w("|---|---:|:-:|---:|:-:|")
for job, a, b in verdicts:
    w(f"| {job} | {a:.2f}× | {'yes' if a >= 1.0 else '**no**'} | {b:.2f}× | {'yes' if b >= 0.95 else '**no**'} |")
w("")
w("## Resident memory, 100 open volumes")
w("")
w("`bench_datapath rss`: one process opens 100 volumes of 10 GiB (4 MiB extents, 2,560 each), each on "
  "its own sparse 10 GiB area file, and reads 4 KiB from each. Target ≤ 64 MiB.")
w("")
w("| I/O driver | result |")
w("|---|---|")
w(f"| auto (io_uring, one ring + completion thread per area) | `{rss_uring}` |")
w(f"| thread pool | `{rss_pool}` |")
w("")
w("Remote volumes: not measured yet (needs the remote backend and extent server, in progress).")
w("")
w("<!-- analysis -->")
analysis = ""
if os.path.exists(out):
    text = open(out).read()
    if "<!-- analysis -->" in text:
        analysis = text.split("<!-- analysis -->", 1)[1].lstrip("\n")
body = "\n".join(lines) + "\n" + ("\n" + analysis if analysis else "")
os.makedirs(os.path.dirname(out), exist_ok=True)
open(out, "w").write(body)
print(body)
EOF

#!/usr/bin/env bash
# A CPU flamegraph of the engine under the load generator.
#
# The engine runs as its own process (`dsplane run --config perf/engine.toml`, the demo ports and
# credentials) and only it is recorded (`perf record -e cpu-clock -g -p PID`), while
# dsplane-loadgen plays the SUs and CSPs against it; the stacks are folded and rendered with
# inferno. cpu-clock is a software event, so this works on VMs without hardware counters.
#
# Usage: perf/flamegraph.sh [SCENARIO] [-- LOADGEN-OPTIONS...]
#   SCENARIO        steady (default), storm, outage, scheduled-flood; or line-rate: the saturated
#                   engine of benches/line_rate.rs (one contender, CONTENDER=..., default
#                   "none, priority, burst 1M"; FRAMES=2000000), the whole bench process recorded
#                   (LINE_RATE_BIN=path records a line_rate binary built elsewhere, e.g. from an
#                   older commit, for a before/after pair)
#   LOADGEN-OPTIONS passed on, e.g. -- --rate 20000 --duration-s 20
# Environment:
#   DURABILITY=none|batch|sync   the engine's durability (default none)
#   SCHEDULING=priority|fifo     (default priority)
#   FREQ=999                     samples per second
#   OUT=perf/out                 where perf.data, stacks.folded and flame.svg go
# Needs perf (apt-get install linux-perf) and inferno (cargo install inferno).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
scenario=steady
if [[ $# -gt 0 && "$1" != "--" ]]; then scenario=$1; shift; fi
[[ "${1:-}" == "--" ]] && shift
out=${OUT:-perf/out}
freq=${FREQ:-999}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target}
for tool in perf inferno-collapse-perf inferno-flamegraph; do
    command -v "$tool" >/dev/null || {
        echo "$tool not found: apt-get install linux-perf; cargo install inferno" >&2
        exit 2
    }
done

if [[ $scenario == line-rate ]]; then
    export RUSTFLAGS="${RUSTFLAGS:-} -C force-frame-pointers=yes"
    bin=${LINE_RATE_BIN:-}
    if [[ -z $bin ]]; then
        bin=$(CARGO_TARGET_DIR=$CARGO_TARGET_DIR/frame-pointers cargo bench --bench line_rate --no-run 2>&1 |
            sed -n 's/.*Executable .*(\(.*\)).*/\1/p' | tail -1)
    fi
    [[ -x "$bin" ]] || { echo "could not build benches/line_rate.rs" >&2; exit 2; }
    mkdir -p "$out"
    LINE_RATE_ONLY=${CONTENDER:-none, priority, burst 1M} perf record -e cpu-clock -F "$freq" -g \
        -o "$out/perf.data" -- "$bin" "${FRAMES:-2000000}" 1 2>"$out/perf-record.log" | tee "$out/line-rate.txt"
    perf script -i "$out/perf.data" 2>/dev/null | inferno-collapse-perf >"$out/stacks.folded"
    inferno-flamegraph --title "dsplane: line rate, ${CONTENDER:-none, priority, burst 1M}" \
        <"$out/stacks.folded" >"$out/flame.svg"
    echo "flamegraph: $out/flame.svg ($(wc -l <"$out/stacks.folded") distinct stacks)"
    exit 0
fi

# Frame pointers, so that `perf record -g` can walk our stacks (std's frames may still be cut
# short; CALL_GRAPH=dwarf gives whole stacks at the price of much larger perf.data).
export RUSTFLAGS="${RUSTFLAGS:-} -C force-frame-pointers=yes"
target_fp=$CARGO_TARGET_DIR/frame-pointers
CARGO_TARGET_DIR=$target_fp cargo build --release -p dsplane --bin dsplane
CARGO_TARGET_DIR=$target_fp cargo build --release -p dsplane-loadgen
bin=$target_fp/release

mkdir -p "$out"
data_dir=$(mktemp -d)
sed -e "s|@DATA_DIR@|$data_dir|" -e "s|@DURABILITY@|${DURABILITY:-none}|" \
    -e "s|@SCHEDULING@|${SCHEDULING:-priority}|" perf/engine.toml >"$out/engine.toml"

DSPLANE_LOG=warn "$bin/dsplane" run --config "$out/engine.toml" >"$out/engine.log" 2>&1 &
engine=$!
cleanup() {
    kill "$engine" 2>/dev/null || true
    wait "$engine" 2>/dev/null || true
    rm -rf "$data_dir"
}
trap cleanup EXIT
# Wait for the SU port.
for _ in $(seq 100); do
    (exec 3<>/dev/tcp/127.0.0.1/7100) 2>/dev/null && break
    sleep 0.1
done

case ${CALL_GRAPH:-fp} in
    dwarf) graph=(--call-graph dwarf) ;;
    *) graph=(-g) ;;
esac
perf record -e cpu-clock -F "$freq" "${graph[@]}" -p "$engine" -o "$out/perf.data" \
    >"$out/perf-record.log" 2>&1 &
recorder=$!
sleep 0.5

"$bin/dsplane-loadgen" "$scenario" --config "$out/engine.toml" --su-rate 1000000 --quiet \
    --html "$out/loadgen-report.html" --json "$out/loadgen.json" "$@" | tee "$out/loadgen.txt" || true

kill -INT "$recorder"
wait "$recorder" || true
perf script -i "$out/perf.data" 2>/dev/null | inferno-collapse-perf >"$out/stacks.folded"
inferno-flamegraph --title "dsplane engine: $scenario" <"$out/stacks.folded" >"$out/flame.svg"
echo "flamegraph: $root/$out/flame.svg ($(wc -l <"$out/stacks.folded") distinct stacks)"

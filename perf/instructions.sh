#!/usr/bin/env bash
# Instructions per message through the sans-IO pipeline (decode -> classify -> enqueue ->
# next_send + limiter -> encode -> ACK), counted by callgrind on the fixed workload of
# benches/pipeline.rs: deterministic, so the numbers compare across commits (they move only when
# the code, the compiler or the workload does).
#
# Usage: perf/instructions.sh [MESSAGES]     (default 200000)
#   ANNOTATE=1 perf/instructions.sh           also print callgrind_annotate's top functions of
#                                              the whole pipeline
# Needs valgrind (apt-get install valgrind).
set -euo pipefail
cd "$(dirname "$0")/.."
messages=${1:-200000}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target}
command -v valgrind >/dev/null || { echo "valgrind not found: apt-get install valgrind" >&2; exit 2; }

# The bench profile (LTO, one codegen unit, debug info), exactly as `cargo bench` builds it.
bin=$(cargo bench -p dsplane --bench pipeline --no-run 2>&1 | sed -n 's/.*Executable .*(\(.*\)).*/\1/p' | tail -1)
[[ -x "$bin" ]] || { echo "could not build benches/pipeline.rs" >&2; exit 2; }

out=${OUT:-$CARGO_TARGET_DIR/callgrind}
mkdir -p "$out"
printf '%-13s %12s %14s  %s\n' mode count instructions per
for mode in header header-naive frames pipeline owner; do
    n=$messages
    unit=message
    case $mode in header*) n=$((messages * 10)); unit=header ;; esac
    # Only the measured_* functions are counted: set-up, workload generation and the warm-up
    # pass are not. Nor is simulated_socket_read, the copy that stands for the kernel's: its
    # inclusive cost (the memcpy of the read) is subtracted below. (A second --toggle-collect
    # on its name does not work: valgrind 3.19 honours only the first, and the copy was counted
    # until this was found.)
    valgrind --tool=callgrind --callgrind-out-file="$out/$mode.out" \
        --toggle-collect='*measured_*' \
        "$bin" "$mode" "$n" >"$out/$mode.log" 2>&1 ||
        { cat "$out/$mode.log" >&2; exit 1; }
    ir=$(sed -n 's/^summary: *\([0-9]*\).*/\1/p' "$out/$mode.out" | head -1)
    [[ -n "$ir" ]] || ir=$(sed -n 's/^totals: *\([0-9]*\).*/\1/p' "$out/$mode.out" | head -1)
    socket=$(callgrind_annotate --inclusive=yes "$out/$mode.out" 2>/dev/null |
        awk '/:pipeline::simulated_socket_read \[/ && !seen { gsub(",", "", $1); print $1; seen = 1 }')
    socket=${socket:-0}
    ir=$((ir - socket))
    awk -v m="$mode" -v n="$n" -v ir="$ir" -v u="$unit" \
        'BEGIN { printf "%-13s %12d %14d  %.1f instructions/%s\n", m, n, ir, ir / n, u }'
    # valgrind counts every iteration of a `rep stos`/`rep movs` as one instruction, so glibc's
    # memset/memcpy of large blocks (fill_from zeroes its 64 KiB read buffer) count one per
    # byte, where a CPU runs one instruction at 32-64 bytes a cycle. Shown apart, to subtract.
    rep=$(callgrind_annotate --inclusive=no "$out/$mode.out" 2>/dev/null |
        awk '/__mem(set|cpy|move)/ { gsub(",", "", $1); s += $1 } END { print s + 0 }')
    # (The socket's memcpy is in that sum and already taken out of the total.)
    rep=$((rep > socket ? rep - socket : 0))
    if [[ "$rep" -gt 0 ]]; then
        awk -v n="$n" -v ir="$ir" -v rep="$rep" -v u="$unit" \
            'BEGIN { printf "%-13s %12s %14d  %.1f instructions/%s in memset/memcpy; %.1f without\n", "", "", rep, rep / n, u, (ir - rep) / n }'
    fi
done
echo "callgrind output: $out/{header,header-naive,frames,pipeline,owner}.out"
if [[ "${ANNOTATE:-0}" == 1 ]]; then
    callgrind_annotate --inclusive=yes "$out/pipeline.out" | head -40
fi

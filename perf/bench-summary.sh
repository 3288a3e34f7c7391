#!/usr/bin/env bash
# Runs every comparison bench and keeps only their summary lines (TIME, RATIO, RATE), plus the
# intake figure and the instruction counts: the raw material of BENCHMARKS.md.
#
# Usage: perf/bench-summary.sh [OUTFILE]    (default $CARGO_TARGET_DIR/bench-summary.txt)
# Takes about 7 minutes on the 2-core development machine.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target}
out=${1:-$CARGO_TARGET_DIR/bench-summary.txt}
{
    echo "# $(date -u +%Y-%m-%dT%H:%MZ) $(git rev-parse --short HEAD) $(nproc) cores"
    # Each bench is in the crate it measures; engine and intake span crates (root package).
    for bench in dsplane-core:ring dsplane-proto:wire dsplane-core:limiter dsplane:engine dsplane-engine:storage; do
        cargo bench -p "${bench%%:*}" --bench "${bench#*:}" 2>/dev/null | grep -E '^(TIME|RATIO|RATE) '
    done
    cargo bench -p dsplane --bench intake >/dev/null 2>&1
    perf/criterion_summary.py intake batch none --elements 1000
    perf/instructions.sh | sed 's/^/INSTR /'
} | tee "$out"

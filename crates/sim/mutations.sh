#!/usr/bin/env bash
# Breaks dsplane on purpose, one way at a time (the `dsplane_mutation` cfg), and runs the
# simulator's seeds from 0 until one fails: the number printed is how many seeds it took to catch
# the bug. A mutation that survives SEEDS seeds is a hole in the simulator's invariants.
#
# Usage: crates/sim/mutations.sh [SEEDS]       (default 1000)
set -euo pipefail
cd "$(dirname "$0")/../.."
seeds=${1:-1000}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/mutations}
printf '%-22s %s\n' mutation result
# name[:simulator flag]: the replicated store's mutations run its model (--replicated).
for entry in ack_before_durable level2_before_level1 forget_spilled_lane skip_storm_count \
    release_ahead_of_older act_without_lease:--replicated clock_beyond_margin:--replicated \
    resume_without_backlog:--replicated; do
    m=${entry%%:*}
    flag=${entry#"$m"}
    flag=${flag#:}
    RUSTFLAGS="--cfg dsplane_mutation=\"$m\"" cargo build --quiet --release -p dsplane-sim
    # shellcheck disable=SC2086 # $flag is one word or none
    out=$("$CARGO_TARGET_DIR/release/dsplane-sim" $flag --seeds "$seeds" 2>&1 || true)
    summary=$(printf '%s\n' "$out" | grep -E '^[0-9]+ seeds, ' | tail -1)
    first=$(printf '%s\n' "$out" | grep -E '^seed [0-9]+ failed' | head -1 | cut -c1-160)
    ran=${summary%% seeds*}
    if printf '%s\n' "$summary" | grep -q ', 0 failed'; then
        printf '%-22s NOT caught in %s seeds\n' "$m" "$seeds"
    else
        printf '%-22s caught after %s seeds: %s\n' "$m" "$ran" "$first"
    fi
done

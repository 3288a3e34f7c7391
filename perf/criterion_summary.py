#!/usr/bin/env python3
"""Median and range per element of criterion benchmarks, and the ratio of their medians, from
the samples criterion saved (`$CARGO_TARGET_DIR/criterion/GROUP/BENCH/new/sample.json`).

For benches that do not print their own ratios, such as `benches/intake.rs`:

    CARGO_TARGET_DIR=... perf/criterion_summary.py intake batch none --elements 1000

prints each bench's median and range in ns per element (and elements per second), then how
many times faster the first is than each of the others (> 1: the first is faster).
"""
import argparse
import json
import os
import statistics
import sys


def per_element(path, elements):
    with open(path) as f:
        d = json.load(f)
    return sorted(t / i / elements for t, i in zip(d["times"], d["iters"]))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("group")
    p.add_argument("benches", nargs="+")
    p.add_argument("--elements", type=float, default=1.0, help="elements per iteration")
    p.add_argument(
        "--dir",
        default=os.path.join(os.environ.get("CARGO_TARGET_DIR", "target"), "criterion"),
    )
    a = p.parse_args()
    medians = {}
    for b in a.benches:
        path = os.path.join(a.dir, a.group, b, "new", "sample.json")
        if not os.path.exists(path):
            sys.exit(f"no samples at {path}: run the bench first")
        per = per_element(path, a.elements)
        m = statistics.median(per)
        medians[b] = m
        print(
            f"TIME  {a.group}/{b}: median {m:.2f} ns/element, range {per[0]:.2f}-{per[-1]:.2f} "
            f"({1e9 / m:,.0f}/s, range {1e9 / per[-1]:,.0f}-{1e9 / per[0]:,.0f})"
        )
    first = a.benches[0]
    for other in a.benches[1:]:
        print(f"RATIO {a.group}: {first} is {medians[other] / medians[first]:.2f}x {other}")


if __name__ == "__main__":
    main()

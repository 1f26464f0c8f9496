#!/usr/bin/env python3
"""A BENCHMARKS.md section from scripts/gpu_check.py's report.

    python3 scripts/gpu_check_rows.py $OUT/gpu_check.json [--command "the device command"] >> BENCHMARKS.md

Prints the device, versions, the command and wall time, the checks table (parity
tiers, layouts, CUDA graphs) and the benchmark's table, all as measured: nothing
is added that the JSON does not hold. A dry run (CPU) is refused unless --allow-dry-run.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def section(results: dict, command: str | None = None) -> str:
    from gpu_check import to_markdown

    results = dict(results)
    if command:
        results["command"] = command
    text = to_markdown(results)
    bench = results.get("bench_markdown")
    if bench:  # the bench's own report, one heading level down
        text = text.replace(bench, bench.replace("## perceptual-engine benchmark", "#### Benchmark (GPU table)"))
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("json", help="gpu_check.json")
    ap.add_argument("--command", default=None, help="the command to record (default: the script's own)")
    ap.add_argument("--allow-dry-run", action="store_true", help="accept a dry run's report (for tests)")
    args = ap.parse_args(argv)
    with open(args.json) as fh:
        results = json.load(fh)
    if results.get("dry_run") and not args.allow_dry_run:
        print(f"gpu_check_rows: {args.json} is a dry run (CPU): no GPU figures to record", file=sys.stderr)
        return 2
    sys.stdout.write(section(results, args.command))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Compare the host time of source trees over several fresh processes: the spread between
processes (memory layout, a shared machine) is larger than the difference a change makes to one
run of ``host_overhead.py`` or ``decode_overhead.py``, so this runs the script ``--runs`` times
per tree, trees alternating, and prints each variant's overhead (%) and added time per layer (µs) as
the median and the range over the runs.

    python scripts/host_ab.py --trees /path/to/old /path/to/new [--script host_overhead.py]
        [--runs 5] [-- extra arguments for the script]

Each tree is put first on ``PYTHONPATH``; the script itself is the one in this folder.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

_ROW = re.compile(r"^\| (\w+) \| [\d.]+ \| ([+-][\d.]+)% \| ([+-]\d+) µs \|$")


def run_once(tree: str, script: Path, extra: list[str]) -> dict[str, tuple[float, int]]:
    env = {**os.environ, "PYTHONPATH": tree}
    out = subprocess.run([sys.executable, str(script), *extra], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{script.name} failed on {tree}:\n{out.stderr[-2000:]}")
    matches = [m for line in out.stdout.splitlines() if (m := _ROW.match(line))]
    rows = {m.group(1): (float(m.group(2)), int(m.group(3))) for m in matches}
    if not rows:
        raise SystemExit(f"no result rows in the output of {script.name} on {tree}:\n{out.stdout[-2000:]}")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trees", nargs="+", required=True, help="source trees (repository roots)")
    ap.add_argument(
        "--script", default="host_overhead.py", choices=("host_overhead.py", "decode_overhead.py")
    )
    ap.add_argument("--runs", type=int, default=5)
    args, extra = ap.parse_known_args()
    extra = [a for a in extra if a != "--"]
    script = Path(__file__).resolve().parent / args.script
    added: dict[str, dict[str, list[tuple[float, int]]]] = {tree: defaultdict(list) for tree in args.trees}
    for i in range(args.runs):
        for tree in args.trees:
            for variant, value in run_once(tree, script, extra).items():
                added[tree][variant].append(value)
        print(f"run {i + 1}/{args.runs} done", file=sys.stderr, flush=True)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"{args.script} {' '.join(extra)}: overhead vs plain and µs added per layer, "
        f"median [min, max] of {args.runs} runs per tree; load average {load}"
    )
    variants = list(added[args.trees[0]])
    print("| variant | " + " | ".join(args.trees) + " |")
    print("|---|" + "---|" * len(args.trees))
    for variant in variants:
        cells = []
        for tree in args.trees:
            pct = [p for p, _ in added[tree][variant]]
            us = [u for _, u in added[tree][variant]]
            cells.append(
                f"{statistics.median(pct):+.1f}% [{min(pct):+.1f}, {max(pct):+.1f}]; "
                f"{statistics.median(us):+.0f} µs [{min(us):+d}, {max(us):+d}]"
            )
        print(f"| {variant} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

#!/usr/bin/env bash
# Run the benchmark suite, then write bench/results/<device>.json, .md and PNG plots.
#   bash scripts/bench.sh                  # full matrix with CUDA, reduced matrix on CPU
#   bash scripts/bench.sh --bench-quick    # tiny smoke run (seconds)
#   bash scripts/bench.sh -k scalearn      # any extra pytest arguments pass through
# The raw pytest-benchmark JSON stays in .benchmarks/ (git-ignored); BENCH_OUT picks the
# report folder (default bench/results).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/setup.sh
stamp="$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p .benchmarks
raw=".benchmarks/run-$stamp.json"
python -m pytest bench/ --benchmark-only --benchmark-json="$raw" -v -s -rs -p no:cacheprovider \
  --benchmark-columns=median,iqr,rounds --benchmark-sort=name "$@"
python -m scalearn_fast.bench report "$raw" --out "${BENCH_OUT:-bench/results}"

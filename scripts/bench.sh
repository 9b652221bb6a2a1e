#!/usr/bin/env bash
# Run the benchmark suite, then write <device>.json, .md and PNG plots.
#   bash scripts/bench.sh                  # full matrix with CUDA, reduced matrix on CPU
#   bash scripts/bench.sh --bench-quick    # tiny smoke run (seconds)
#   bash scripts/bench.sh -k scalearn      # any extra pytest arguments pass through
# The raw pytest-benchmark JSON stays in .benchmarks/ (git-ignored). The report goes to
# bench/results (the committed results) for a full run only; a partial run (any extra argument,
# or SCALEARN_BENCH_QUICK=1) reports into .benchmarks/report-<stamp>/ so it cannot overwrite
# them. BENCH_OUT picks the report folder either way.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/setup.sh
stamp="$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p .benchmarks
raw=".benchmarks/run-$stamp.json"
out="bench/results"
if [ "$#" -gt 0 ] || [ "${SCALEARN_BENCH_QUICK:-0}" = "1" ]; then
  out=".benchmarks/report-$stamp"
fi
out="${BENCH_OUT:-$out}"
python -m pytest bench/ --benchmark-only --benchmark-json="$raw" -v -s -rs -p no:cacheprovider \
  --benchmark-columns=median,iqr,rounds --benchmark-sort=name "$@"
python -m scalearn_fast.bench report "$raw" --out "$out"
echo "report: $out (raw: $raw)"

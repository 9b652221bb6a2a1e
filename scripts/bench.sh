#!/usr/bin/env bash
# Run the benchmark suite in its own folder, then write the report there.
#   bash scripts/bench.sh                  # full matrix with CUDA, reduced matrix on CPU
#   bash scripts/bench.sh --bench-quick    # tiny smoke run (seconds to minutes)
#   bash scripts/bench.sh -k scalearn      # any extra pytest arguments pass through
#   bash scripts/bench.sh --publish        # also copy the report into bench/results/ (the committed results)
# A run writes bench/runs/<device>-<UTC stamp>/ (git-ignored; BENCH_OUT picks another folder):
# raw.json (the rows, rewritten after every group), log.txt, and the report (<device>.json, .md, PNGs).
# Nothing outside that folder changes unless --publish is given.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
publish=()
args=()
for a in "$@"; do
  if [ "$a" = "--publish" ]; then publish=(--publish); else args+=("$a"); fi
done
quick="${SCALEARN_BENCH_QUICK:-0}"
for a in "${args[@]}"; do [ "$a" = "--bench-quick" ] && quick=1; done
if [ "${#publish[@]}" -gt 0 ] && [ "$quick" = 1 ]; then
  echo "bench.sh: --publish with --bench-quick: tiny smoke shapes are not results to commit" >&2
  exit 2
fi
. scripts/setup.sh
slug="$(python -c 'from scalearn_fast.bench.device import current_slug; print(current_slug())')"
run="${BENCH_OUT:-bench/runs/$slug-$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$run"
echo "bench: run folder $run" >&2
start=$(date +%s)
set +e
python -m pytest bench/ --bench-json "$run/raw.json" -q -s -rs -p no:cacheprovider "${args[@]}" 2>&1 \
  | tee "$run/log.txt"
rc=${PIPESTATUS[0]}
set -e
if [ -s "$run/raw.json" ]; then
  if [ "${#publish[@]}" -gt 0 ] && [ "${#args[@]}" -gt 0 ]; then
    echo "bench: publishing a partial run (${args[*]}) replaces bench/results/$slug.* with it" >&2
  fi
  python -m scalearn_fast.bench report "$run/raw.json" --out "$run" "${publish[@]}"
fi
echo "bench: $(( $(date +%s) - start )) s; report and rows in $run (pytest rc=$rc)" | tee -a "$run/log.txt"
exit "$rc"

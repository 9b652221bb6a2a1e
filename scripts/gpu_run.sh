#!/usr/bin/env bash
# The one GPU command: on an H100/H200, in about 8 minutes, into one results folder:
#   0. native   build the optional native sites (scalearn_fast/site_extension; a C++ compiler
#               and ninja; without them, or past its limit, everything runs in Python)
#   1. tests    the GPU tests (Triton kernels, fused layers, bf16/fp16 cases)
#   2. bench    the benchmark suite: ScaLearn and AdapterFusion layers at the default shape for every
#               provider, the 12-layer model (eager inference, inference replayed from a CUDA graph,
#               training step), then the N and T sweeps (and the rest) while the time budget lasts
#   3. profile  host vs device time per provider and model variant (scripts/gpu_profile.py)
#   4. report   <device>.json, <device>.md and the plots from the bench rows
#
#   bash scripts/gpu_run.sh                 # everything, into $OUT (the device tool's folder) or gpu-out/<stamp>
#   bash scripts/gpu_run.sh --dry-run       # what it would run, in order, with each stage's time limit (no GPU needed)
#   bash scripts/gpu_run.sh --out DIR --only tests,bench
#
# From source (PYTHONPATH=.), nothing installed. The folder holds at most 8 files (what the device tool
# brings back): log.txt (tests, bench, summary), profile.txt, raw.json (bench rows), and the report:
# <device>.json, <device>.md, <device>-roofline.png, -speedup-vs-n.png, -speedup-vs-t.png. To publish:
# copy the report files into bench/results/ (or `python -m scalearn_fast.bench report DIR/raw.json --publish`).
#
# Time (seconds, environment): GPU_RUN_S=450 in all; GPU_NATIVE_S=90; GPU_TESTS_S=90; GPU_PROFILE_S=70; GPU_REPORT_S=30;
# the bench gets what is left, and starts no new group in its last GPU_BENCH_MARGIN_S=60.
# GPU_TESTS: the test files (default below); GPU_BENCH_ARGS: extra pytest arguments for the bench.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH=. PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
py="${PYTHON:-python}"
dry=0
only="native,tests,bench,profile,report"
out="${OUT:-}"
while [ "$#" -gt 0 ]; do
  case "$1" in
    --dry-run) dry=1 ;;
    --only) only="$2"; shift ;;
    --out) out="$2"; shift ;;
    -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
    *) echo "gpu_run.sh: unknown argument '$1' (expected --dry-run, --only STAGES, --out DIR)" >&2; exit 2 ;;
  esac
  shift
done
for s in ${only//,/ }; do
  case "$s" in native|tests|bench|profile|report) ;; *)
    echo "gpu_run.sh: --only takes native, tests, bench, profile, report (comma-separated); got '$s'" >&2
    exit 2 ;;
  esac
done
out="${out:-gpu-out/$(date -u +%Y%m%dT%H%M%SZ)}"
total="${GPU_RUN_S:-450}"
native_s="${GPU_NATIVE_S:-90}"
tests_s="${GPU_TESTS_S:-90}"
profile_s="${GPU_PROFILE_S:-70}"
report_s="${GPU_REPORT_S:-30}"
margin="${GPU_BENCH_MARGIN_S:-60}"
gpu_tests="${GPU_TESTS:-tests/test_triton_kernels.py tests/test_fusion.py tests/test_layer.py tests/test_scaled_adapter_sum.py}"
bench_opts=(--bench-compile default -q -s -rs -p no:cacheprovider)
# shellcheck disable=SC2206  (extra pytest arguments for the bench, word-split on purpose)
bench_opts+=(${GPU_BENCH_ARGS:-})
start=$(date +%s)
wants() { [[ ",$only," == *",$1,"* ]]; }
left() { echo $(( total - ($(date +%s) - start) )); }
log="$out/log.txt"
summary=()

status=0
run_stage() {  # name limit file command...: run it under timeout, its output into file, log rc and seconds
  local name="$1" limit="$2" dest="$3"; shift 3
  local t0 rc msg
  t0=$(date +%s)
  echo "=== $name (limit ${limit}s): $*" | tee -a "$log"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$dest"
  rc=${PIPESTATUS[0]}
  msg="$name rc=$rc in $(( $(date +%s) - t0 ))s"
  [ "$rc" = 124 ] && msg="$msg (stopped at its time limit)"
  echo "=== $msg" | tee -a "$log"
  summary+=("$msg")
  [ "$rc" = 0 ] || status=1
}

if [ "$dry" = 1 ]; then
  bench_left=$(( total - native_s - tests_s - profile_s - report_s ))
  echo "gpu_run.sh --dry-run: stages in order, each with the time limit it gets when the ones before use all of theirs"
  echo "output folder: $out (log.txt, profile.txt, raw.json, the report)"
  n=1
  if wants native; then
    echo "$n. native (${native_s}s): $py -m scalearn_fast.site_extension"; n=$((n + 1))
  fi
  if wants tests; then
    echo "$n. tests (${tests_s}s): $py -m pytest -q -rs -p no:cacheprovider $gpu_tests"; n=$((n + 1))
  fi
  if wants bench; then
    echo "$n. bench (${bench_left}s, no new group after $(( bench_left - margin ))s): $py -m pytest bench/" \
      "--bench-json $out/raw.json --bench-budget $(( bench_left - margin )) ${bench_opts[*]}"
    echo "   groups, in the order they run (each times every provider of one shape and mode; on a GPU):"
    SCALEARN_BENCH_MATRIX=cuda "$py" -m pytest bench/ --collect-only -q -p no:cacheprovider --bench-compile default \
      2>/dev/null | grep '::' | sed 's/^/     /'
    n=$((n + 1))
  fi
  if wants profile; then
    echo "$n. profile (${profile_s}s): $py scripts/gpu_profile.py --tokens 4096 65536 > $out/profile.txt"; n=$((n + 1))
  fi
  if wants report; then
    echo "$n. report (${report_s}s): $py -m scalearn_fast.bench report $out/raw.json --out $out"
  fi
  echo "total limit: ${total}s"
  exit 0
fi

mkdir -p "$out"
: > "$log"
{ nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit --format=csv 2>&1 || true
  "$py" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, \
'cuda', torch.version.cuda, 'device', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
  "$py" -c "import triton, transformers; print('triton', triton.__version__, 'transformers', transformers.__version__)" \
    2>&1 || true
  git log -1 --format='commit %h %s' 2>/dev/null || true
} 2>&1 | tee -a "$log"

if wants native; then
  run_stage native "$native_s" "$log" "$py" -m scalearn_fast.site_extension
fi
if wants tests; then
  # shellcheck disable=SC2086  (the list is word-split on purpose)
  run_stage tests "$tests_s" "$log" "$py" -m pytest -q -rs -p no:cacheprovider $gpu_tests
fi
if wants bench; then
  reserve=$report_s
  wants profile && reserve=$(( reserve + profile_s ))
  limit=$(( $(left) - reserve )); [ "$limit" -lt 60 ] && limit=60
  budget=$(( limit - margin )); [ "$budget" -lt 10 ] && budget=10
  run_stage bench "$limit" "$log" "$py" -m pytest bench/ --bench-json "$out/raw.json" --bench-budget "$budget" \
    "${bench_opts[@]}"
fi
if wants profile; then
  limit=$(( $(left) - report_s )); [ "$limit" -gt "$profile_s" ] && limit="$profile_s"; [ "$limit" -lt 30 ] && limit=30
  : > "$out/profile.txt"
  run_stage profile "$limit" "$out/profile.txt" "$py" scripts/gpu_profile.py --tokens 4096 65536
fi
if wants report; then
  if [ -s "$out/raw.json" ]; then
    run_stage report "$report_s" "$log" "$py" -m scalearn_fast.bench report "$out/raw.json" --out "$out"
  else
    echo "=== report: no bench rows in $out/raw.json" | tee -a "$log"
    status=1
  fi
fi
{ echo "=== summary"; printf '  %s\n' "${summary[@]}"
  echo "=== gpu_run.sh done in $(( $(date +%s) - start ))s; folder: $out"; } | tee -a "$log"
exit "$status"

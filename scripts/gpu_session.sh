#!/usr/bin/env bash
# What a session that is lent a GPU runs there, from source (PYTHONPATH=., nothing installed),
# in few calls of the device tool (10 minutes each). Output goes to $OUT (the device tool's
# folder) or ./gpu-out: at most 8 files, as the tool brings back.
#
#   bash scripts/gpu_session.sh tests          # triton + fusion tests on the GPU (bf16/fp16 cases)
#   bash scripts/gpu_session.sh profile        # host vs device time per provider (scripts/gpu_profile.py)
#   bash scripts/gpu_session.sh bench [ARGS]   # benchmark suite (+ pytest args, e.g. -k "scalearn and fwd")
#   bash scripts/gpu_session.sh all            # tests, then the benchmark with the time left
#
# Then, here: copy <out>/results/* into bench/results/ (file names carry the GPU's name), update the
# README headline table and docs/benchmarks.md from <out>/results/<gpu>.md, and commit.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out="${OUT:-gpu-out}"
mkdir -p "$out/results"
export PYTHONPATH=. PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
stage="${1:-all}"
shift || true

tests() {
  { nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit --format=csv
    python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', \
triton.__version__, 'transformers', transformers.__version__)"
    timeout "${TEST_TIMEOUT:-300}" python -m pytest -q -rs -p no:cacheprovider \
      tests/test_triton_kernels.py tests/test_fusion.py tests/test_layer.py tests/test_scaled_adapter_sum.py
    echo "tests rc=$?"
  } 2>&1 | tee "$out/tests.txt"
}

profile() {
  timeout "${PROFILE_TIMEOUT:-400}" python scripts/gpu_profile.py "$@" 2>&1 | grep -v "Warning" \
    | tee "$out/profile.txt"
  echo "profile rc=${PIPESTATUS[0]}" | tee -a "$out/profile.txt"
}

bench() {
  timeout "${BENCH_TIMEOUT:-540}" python -m pytest bench/ --benchmark-only -v -s -rs -p no:cacheprovider \
    --benchmark-json="$out/bench-raw.json" --benchmark-columns=median,iqr,rounds --benchmark-sort=name \
    "$@" 2>&1 | tail -n 400 > "$out/bench-log.txt"
  echo "bench rc=${PIPESTATUS[0]}" | tee -a "$out/bench-log.txt"
  if [ -s "$out/bench-raw.json" ]; then
    python -m scalearn_fast.bench report "$out/bench-raw.json" --out "$out/results"
  fi
}

case "$stage" in
  tests) tests ;;
  profile) profile "$@" ;;
  bench) bench "$@" ;;
  all) tests; BENCH_TIMEOUT="${BENCH_TIMEOUT:-300}" bench "$@" ;;
  *) echo "usage: $0 tests|profile|bench|all [args]" >&2; exit 2 ;;
esac

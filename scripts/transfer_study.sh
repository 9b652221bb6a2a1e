#!/usr/bin/env bash
# A reduced transfer study in the paper's protocol (docs/training.md, "The paper's protocol"):
# stage-1 adapters on every GLUE task of the folder, then for each target (RTE, MRPC) and seed:
# the single-task adapter, AdapterFusion and the four ScaLearn variants over all adapters with
# the target's own included (last). Ends with mean ± std per method and target.
#
#   SCALEARN_FAST_GLUE_DIR=/path/to/glue scripts/transfer_study.sh [OUT]
#
# Knobs (environment): MODEL (local HF folder; default the MiniLM), SEEDS ("0 1 2"),
# SOURCES ("cola mnli mrpc qnli rte sst-2 sts-b"), TARGETS ("rte mrpc"), MAXLEN (64),
# STEPS1 / STEPS2 (optimizer-step caps of stage 1 / the transfer runs: 300 / 300),
# TRAIN1 (stage-1 training examples per source: 4000), EVAL (dev examples: 400).
# The lr values are the official ones (--recipe paper: 3e-4, 6e-3, 5e-5), with the epoch count
# capped by the step caps, patience 0 (no early stop inside so few evaluations) and evaluation
# every EVERY (50) steps: a budget cut, to be stated with any figure this produces.
set -euo pipefail
OUT=${1:-runs/transfer-study}
: "${SCALEARN_FAST_GLUE_DIR:?set SCALEARN_FAST_GLUE_DIR to a GLUE folder (TASK/train.tsv, dev.tsv)}"
SEEDS=${SEEDS-"0 1 2"}  # set but empty: none (e.g. TARGETS= runs stage 1 only)
SOURCES=${SOURCES-"cola mnli mrpc qnli rte sst-2 sts-b"}
TARGETS=${TARGETS-"rte mrpc"}
MAXLEN=${MAXLEN:-64}
STEPS1=${STEPS1:-300}
STEPS2=${STEPS2:-300}
TRAIN1=${TRAIN1:-4000}
EVAL=${EVAL:-400}
EVERY=${EVERY:-50}
MODEL_ARG=()
if [[ -n "${MODEL:-}" ]]; then MODEL_ARG=(--model "$MODEL"); fi
export HF_HUB_OFFLINE=1
run() { python -m scalearn_fast "$@" "${MODEL_ARG[@]}" --recipe paper --max-length "$MAXLEN" \
  --max-eval-samples "$EVAL" --eval-every "$EVERY" --patience 0 --no-progress --overwrite; }

for t in $SOURCES; do  # stage 1 once per source task (seed 42)
  [[ -f $OUT/adapters/$t/results.json ]] || run train-adapter --task "$t" --output "$OUT/adapters/$t" \
    --max-train-samples "$TRAIN1" --max-steps "$STEPS1" --seed 42
done

for target in $TARGETS; do
  others=()
  for t in $SOURCES; do [[ $t == "$target" ]] || others+=("$OUT/adapters/$t"); done
  for seed in $SEEDS; do
    dir=$OUT/$target/$seed
    own=$dir/single-adapter  # the target's own adapter of this seed: baseline and included source
    [[ -f $own/results.json ]] || run train-adapter --task "$target" --output "$own" --max-steps "$STEPS2" \
      --seed "$seed"
    [[ -f $dir/fusion/results.json ]] || run train-fusion --task "$target" --sources "${others[@]}" \
      --include-target "$own" --output "$dir/fusion" --max-steps "$STEPS2" --seed "$seed"
    for v in scalearn scalearn_uniform scalearn++ scalearn_uniform++; do
      [[ -f $dir/$v/results.json ]] || run train-scalearn --task "$target" --sources "${others[@]}" \
        --include-target "$own" --variant "$v" --output "$dir/$v" --max-steps "$STEPS2" --seed "$seed"
    done
  done
done

python - "$OUT" <<'EOF'
import json, statistics, sys
from collections import defaultdict
from pathlib import Path

scores = defaultdict(list)
for path in sorted(Path(sys.argv[1]).glob("*/*/*/results.json")):
    r = json.loads(path.read_text())
    scores[(r["task"], path.parent.name)].append(100 * r["best_dev"]["main"])
print("| target | method | seeds | dev main (%) mean ± std |")
print("|---|---|---|---|")
for (task, method), xs in sorted(scores.items()):
    std = statistics.stdev(xs) if len(xs) > 1 else float("nan")
    print(f"| {task} | {method} | {len(xs)} | {statistics.mean(xs):.2f} ± {std:.2f} |")
EOF

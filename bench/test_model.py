"""Model level: a RoBERTa-shaped encoder plain vs ScaLearn (naive, fused) vs AdapterFusion, in
inference (eager, and on CUDA replayed from a captured graph) and a training step, the variants
timed in interleaved rounds; the report computes the overhead over plain."""

from __future__ import annotations

from scalearn_fast.bench.model import MODEL_VARIANTS, run_model_case


def test_model(group_run, model_case, model_mode):
    run_model_case(group_run, model_case, model_mode, list(MODEL_VARIANTS))

"""Model level: a RoBERTa-shaped encoder plain vs ScaLearn (naive, fused) vs AdapterFusion, in
inference (eager, and on CUDA replayed from a captured graph) and a training step, the variants
timed in interleaved rounds; the report computes the overhead over plain."""

from __future__ import annotations

from scalearn_fast.bench.model import MODEL_VARIANTS, run_model_case


def test_model(writer, model_case, model_mode, device, record, quick, skip_provider):
    run_model_case(
        writer,
        model_case,
        model_mode,
        device,
        record,
        quick,
        list(MODEL_VARIANTS),
        skip=lambda name: skip_provider(name, model_case),
    )

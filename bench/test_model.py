"""Model level: a RoBERTa-shaped encoder plain vs ScaLearn (naive, fused) vs AdapterFusion,
inference (tokens/s) and a training step; the report computes the overhead over plain."""

from __future__ import annotations

import pytest
import torch

from scalearn_fast.bench.flops import row_cost
from scalearn_fast.bench.harness import run_case
from scalearn_fast.bench.model import build_model, inference_step, train_step
from scalearn_fast.bench.providers import ProviderUnavailable


def test_model(benchmark, model_case, variant, model_mode, device, record, quick):
    c = model_case
    try:
        m = build_model(variant, c, device)
    except ProviderUnavailable as exc:
        pytest.skip(str(exc))
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 1000, (c.batch, c.seq), generator=gen).to(device)
    labels = torch.randint(0, 2, (c.batch,), generator=gen).to(device)
    train = model_mode == "train"
    fn = train_step(m, ids, labels) if train else inference_step(m, ids)
    benchmark.group = f"model {model_mode} {c.id}"
    params = {
        "kind": "model",
        "provider": variant,
        "mode": model_mode,
        "case": c.id,
        "layers": c.layers,
        "d": c.d,
        "n": c.n,
        "batch": c.batch,
        "seq": c.seq,
        "ffn": c.ffn,
        "attach": m.attach,
    }
    dtype_name = str(c.dtype).removeprefix("torch.")
    cost = row_cost({**params, "dtype": dtype_name, "tokens": c.tokens})  # the report's count too
    assert cost is not None, params
    run_case(
        benchmark,
        fn,
        device=device,
        warmup=2,
        params=params,
        tokens=c.tokens,
        cost=cost,
        record=record,
        dtype=c.dtype,
        quick=quick,
    )

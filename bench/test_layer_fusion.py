"""AdapterFusion ("dynamic") at the same shapes: a faithful naive loop, the adapters library's own
fusion layer, and the fused providers (issue 5) once registered in FUSION_PROVIDERS."""

from __future__ import annotations

import pytest
import torch

from scalearn_fast.bench.flops import fusion_cost
from scalearn_fast.bench.harness import layer_step, run_case
from scalearn_fast.bench.providers import FUSION_PROVIDERS, ProviderUnavailable, make_sources


def test_fusion_layer(benchmark, fusion_case, provider, mode, device, record, quick):
    c = fusion_case
    src = make_sources(c.n, c.d, c.r, dtype=c.dtype, device=device)
    try:
        p = FUSION_PROVIDERS[provider](src)
    except ProviderUnavailable as exc:
        pytest.skip(str(exc))
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(c.batch, c.seq, c.d, generator=gen).to(device=device, dtype=c.dtype)
    residual = torch.randn(c.batch, c.seq, c.d, generator=gen).to(device=device, dtype=c.dtype)
    benchmark.group = f"fusion {mode} {c.id}"
    params = {
        "kind": "fusion",
        "provider": provider,
        "mode": mode,
        "case": c.id,
        "d": c.d,
        "r": c.r,
        "n": c.n,
        "batch": c.batch,
        "seq": c.seq,
    }
    cost = fusion_cost(c.tokens, c.d, c.r, c.n, elem_bytes=z.element_size(), backward=mode == "fwdbwd")
    run_case(
        benchmark,
        layer_step(p, z, residual, mode),
        device=device,
        warmup=p.warmup,
        params=params,
        tokens=c.tokens,
        cost=cost,
        record=record,
        dtype=c.dtype,
        quick=quick,
    )

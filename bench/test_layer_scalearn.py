"""ScaLearn composition at one layer: naive loop vs torch.compile vs the torch and Triton backends."""

from __future__ import annotations

import pytest
import torch

from scalearn_fast.bench.flops import scalearn_cost
from scalearn_fast.bench.harness import layer_step, run_case
from scalearn_fast.bench.providers import SCALEARN_PROVIDERS, ProviderUnavailable, make_sources


def test_scalearn_layer(benchmark, layer_case, provider, mode, device, record, quick):
    c = layer_case
    src = make_sources(c.n, c.d, c.r, dtype=c.dtype, device=device)
    try:
        p = SCALEARN_PROVIDERS[provider](src)
    except ProviderUnavailable as exc:
        pytest.skip(str(exc))
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(c.batch, c.seq, c.d, generator=gen).to(device=device, dtype=c.dtype)
    residual = torch.randn(c.batch, c.seq, c.d, generator=gen).to(device=device, dtype=c.dtype)
    benchmark.group = f"scalearn {mode} {c.id}"
    params = {
        "kind": "scalearn",
        "provider": provider,
        "mode": mode,
        "case": c.id,
        "d": c.d,
        "r": c.r,
        "n": c.n,
        "batch": c.batch,
        "seq": c.seq,
    }
    cost = scalearn_cost(c.tokens, c.d, c.r, c.n, elem_bytes=z.element_size(), backward=mode == "fwdbwd")
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

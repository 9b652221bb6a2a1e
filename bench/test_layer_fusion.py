"""AdapterFusion ("dynamic") at the same shapes: a faithful naive loop, the adapters library's own
fusion layer, and the fused providers (issue 5) registered in FUSION_PROVIDERS."""

from __future__ import annotations

from scalearn_fast.bench.flops import fusion_cost
from scalearn_fast.bench.harness import run_layer_case
from scalearn_fast.bench.providers import FUSION_PROVIDERS


def test_fusion_layer(benchmark, fusion_case, provider, mode, device, record, quick):
    run_layer_case(
        benchmark, "fusion", FUSION_PROVIDERS, fusion_cost, fusion_case, provider, mode, device, record, quick
    )

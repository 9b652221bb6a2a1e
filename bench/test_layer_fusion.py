"""AdapterFusion ("dynamic") at the same shapes: a faithful naive loop, the adapters library's own
fusion layer, and the fused providers registered in FUSION_PROVIDERS, timed in interleaved rounds."""

from __future__ import annotations

from scalearn_fast.bench.flops import fusion_cost
from scalearn_fast.bench.harness import run_layer_case
from scalearn_fast.bench.providers import FUSION_PROVIDERS


def test_fusion_layer(group_run, fusion_case, mode):
    run_layer_case(group_run, "fusion", FUSION_PROVIDERS, fusion_cost, fusion_case, mode)

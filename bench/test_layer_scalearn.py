"""ScaLearn composition at one layer: naive loop vs torch.compile vs the torch and Triton backends."""

from __future__ import annotations

from scalearn_fast.bench.flops import scalearn_cost
from scalearn_fast.bench.harness import run_layer_case
from scalearn_fast.bench.providers import SCALEARN_PROVIDERS


def test_scalearn_layer(benchmark, layer_case, provider, mode, device, record, quick):
    run_layer_case(
        benchmark,
        "scalearn",
        SCALEARN_PROVIDERS,
        scalearn_cost,
        layer_case,
        provider,
        mode,
        device,
        record,
        quick,
    )

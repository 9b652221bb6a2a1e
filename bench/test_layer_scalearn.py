"""ScaLearn composition at one layer: naive loop vs torch.compile vs the torch and Triton
backends, every provider of a shape and mode timed in interleaved rounds."""

from __future__ import annotations

from scalearn_fast.bench.flops import scalearn_cost
from scalearn_fast.bench.harness import run_layer_case
from scalearn_fast.bench.providers import SCALEARN_PROVIDERS


def test_scalearn_layer(writer, layer_case, mode, device, record, quick, skip_provider):
    run_layer_case(
        writer,
        "scalearn",
        SCALEARN_PROVIDERS,
        scalearn_cost,
        layer_case,
        mode,
        device,
        record,
        quick,
        skip=lambda name: skip_provider(name, layer_case),
    )

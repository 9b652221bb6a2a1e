"""ScaLearn composition at one layer: naive loop vs torch.compile vs the torch and Triton
backends, every provider of a shape and mode timed in interleaved rounds."""

from __future__ import annotations

from scalearn_fast.bench.flops import scalearn_cost
from scalearn_fast.bench.harness import run_layer_case
from scalearn_fast.bench.providers import SCALEARN_PROVIDERS


def test_scalearn_layer(group_run, layer_case, mode):
    run_layer_case(group_run, "scalearn", SCALEARN_PROVIDERS, scalearn_cost, layer_case, mode)

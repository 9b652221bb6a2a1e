"""Routed composition (L2R) at the default shape: the loop as ``adapters`` / PEFT run it (each
adapter on its own, the outputs weighted by the router's gates) against ``RouterLayer`` in
output and merge mode, sequence and token gates, timed in interleaved rounds
(``scalearn_fast.bench.providers_router``). The rows carry the saved activation bytes of the
forward+backward groups. Targets on CPU fp32: forward+backward >= 3x the loop, saved
activations <= 1/N of the loop's."""

from __future__ import annotations

import torch

from scalearn_fast.bench.harness import run_layer_case
from scalearn_fast.bench.providers_router import ROUTER_PROVIDERS, router_cases, router_cost


def pytest_generate_tests(metafunc):
    if "router_case" in metafunc.fixturenames:
        from conftest import MATRIX_CUDA, is_quick

        cases = router_cases(MATRIX_CUDA, is_quick(metafunc.config))
        metafunc.parametrize("router_case", cases, ids=[c.id for c in cases])


def test_router_layer(group_run, router_case, mode):
    torch.manual_seed(0)
    run_layer_case(group_run, "router", ROUTER_PROVIDERS, router_cost, router_case, mode)

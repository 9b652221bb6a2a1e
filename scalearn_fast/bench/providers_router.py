"""Routed composition (L2R) in the suite: the loop as ``adapters`` / PEFT run it against
``RouterLayer`` (docs/routing.md), one router per layer (``nn.Linear(d, N)``, softmax gates).

Providers (``forward(z, residual)``; the router's weight and bias train in forward+backward):

- ``naive``: per-sequence gates from z's mean over the tokens, each adapter run on its own
  (Linear -> ReLU -> Linear, a [T, d] output each) and the outputs summed with the gates;
- ``naive_token``: the same loop with a gate per token;
- ``output_sequence`` / ``output_token``: ``RouterLayer`` in output mode (the core op with
  ``row_scale``);
- ``merge_sequence`` / ``merge_token``: ``RouterLayer`` in merge mode (the B merged adapters
  built per sequence; the packed two-GEMM form per token).

The fused providers run the ``auto`` backend (the torch backend off CUDA). Every provider is
charged the same nominal cost, ``router_cost``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .flops import OpCost, scalearn_cost
from .matrix import LayerCase, _case
from .providers import Provider, ProviderFactory, Sources, _bottlenecks


def router_cases(cuda: bool, quick: bool) -> list[LayerCase]:
    """The default shape (d 768, r 48, N 8, T 4096; bf16 on CUDA, fp32 on CPU); a tiny one with
    ``quick``. ``SCALEARN_BENCH_ROUTER_TOKENS`` overrides T on CPU (a loaded machine)."""
    import os

    if quick:
        return [_case(64, 4, 256, torch.float32)]
    if cuda:
        return [_case(768, 8, 4096, torch.bfloat16)]
    tokens = int(os.environ.get("SCALEARN_BENCH_ROUTER_TOKENS", "4096"))
    return [_case(768, 8, tokens, torch.float32)]


def router_cost(tokens: int, d: int, r: int, n: int, *, elem_bytes: int, backward: bool) -> OpCost:
    """ScaLearn's cost (``scalearn_cost``: the same two GEMMs, the gates in place of ω) plus the
    router: 2TdN FLOPs forward (per token; a sequence router does less), twice that backward,
    and its weights (dN + N elements) read."""
    base = scalearn_cost(tokens, d, r, n, elem_bytes=elem_bytes, backward=backward)
    flops = 2 * tokens * d * n * (3 if backward else 1)
    return OpCost(base.flops + flops, base.min_bytes + (d * n + n) * elem_bytes)


def _router(d: int, n: int, like: torch.Tensor, seed: int = 2) -> nn.Linear:
    """A router with small random weights (so the gates are not uniform)."""
    g = torch.Generator().manual_seed(seed)
    router = nn.Linear(d, n, device=like.device, dtype=like.dtype)
    with torch.no_grad():
        router.weight.copy_(torch.randn(n, d, generator=g) * 0.02)
        router.bias.copy_(torch.randn(n, generator=g) * 0.02)
    return router


class NaiveRouter(nn.Module):
    """The loop: gates from the router, each frozen adapter on its own, the weighted sum."""

    def __init__(self, src: Sources, granularity: str) -> None:
        super().__init__()
        self.adapters = _bottlenecks(src)
        self.router = _router(src.d, len(self.adapters), src.w_down)
        self.granularity = granularity

    def forward(self, z: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        pooled = z.mean(dim=1) if self.granularity == "sequence" else z
        g = F.softmax(self.router(pooled), dim=-1)
        if self.granularity == "sequence":
            g = g.unsqueeze(1)  # [B, 1, N]
        out = residual
        for i, adapter in enumerate(self.adapters):
            out = out + g[..., i : i + 1] * adapter(z)
        return out


class FusedRouter(nn.Module):
    """``RouterLayer.compose`` at the loop's weights (its router copied from ``NaiveRouter``'s
    seed), in ``mode`` and ``granularity``."""

    def __init__(self, src: Sources, mode: str, granularity: str, backend: str = "auto") -> None:
        super().__init__()
        from ..layers_router import RouterLayer

        self.layer = RouterLayer(
            src.w_down, src.b_down, src.w_up, src.b_up, mode=mode, granularity=granularity, backend=backend
        )
        router = _router(src.d, self.layer.num_sources, src.w_down)
        with torch.no_grad():
            self.layer.router.weight.copy_(router.weight)
            self.layer.router.bias.copy_(router.bias)

    def forward(self, z: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.layer.compose(z, residual)


def _naive(granularity: str) -> ProviderFactory:
    def build(src: Sources) -> Provider:
        m = NaiveRouter(src, granularity).eval()
        return Provider(m, list(m.router.parameters()))

    return build


def _fused(mode: str, granularity: str) -> ProviderFactory:
    def build(src: Sources) -> Provider:
        m = FusedRouter(src, mode, granularity).eval()
        return Provider(
            m, list(m.layer.router.parameters()), warmup=1 if src.w_down.device.type == "cpu" else 3
        )

    return build


ROUTER_PROVIDERS: dict[str, ProviderFactory] = {
    "naive": _naive("sequence"),
    "naive_token": _naive("token"),
    "output_sequence": _fused("output", "sequence"),
    "output_token": _fused("output", "token"),
    "merge_sequence": _fused("merge", "sequence"),
    "merge_token": _fused("merge", "token"),
}

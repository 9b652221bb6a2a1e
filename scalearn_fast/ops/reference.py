"""The oracle: ScaLearn's composition as the readable per-adapter loop.

    out = Σ_i ω_i ⊙ (W_up_i · act(W_down_i · z + b_down_i) + b_up_i) + residual

This is what `adapters` computes, one adapter at a time, each materialising a
[T, d] output. It is slow on purpose and differentiable by plain autograd; every
fast backend is tested against it in float64.
"""

from __future__ import annotations

import torch

from .activations import activation_fn, activation_grad  # noqa: F401  (re-exported)
from .packing import PackedSources


def scaled_adapter_sum_reference(
    z: torch.Tensor,
    packed: PackedSources,
    omega: torch.Tensor,
    residual: torch.Tensor | None = None,
    *,
    activation: str = "relu",
    row_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Loop over sources; ``row_scale [..., N]`` optionally weights each source's output per
    token (a router, a gate, AdapterFusion's softmax): ``Σ_i row_scale[t, i] · ω_i ⊙ A_i(z_t)``."""
    out = torch.zeros_like(z) if residual is None else residual.clone()
    start = 0
    for i, r in enumerate(packed.ranks):
        w_down = packed.w_down[start : start + r]
        b_down = packed.b_down[start : start + r]
        w_up = packed.w_up[:, start : start + r]
        start += r
        adapter_out = activation_fn(activation, z @ w_down.T + b_down) @ w_up.T + packed.b_up[i]
        if row_scale is not None:
            adapter_out = adapter_out * row_scale[..., i : i + 1]
        out = out + omega[i] * adapter_out
    return out
